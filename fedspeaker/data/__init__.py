"""Speech in: audio decoding, corpora and their split, torchaudio features (cached), partitions."""
