"""What a run writes: rounds.csv, summary.json and plots."""
