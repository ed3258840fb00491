"""The simulation harness: federations through Flower's Simulation Engine, comparisons, benchmarks."""
