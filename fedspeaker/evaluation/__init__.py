"""Scoring speaker models: identification accuracy, verification EER, embeddings."""
