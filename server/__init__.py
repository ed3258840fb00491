"""The Flower ServerApp: strategies, secure aggregation, checkpoints."""
