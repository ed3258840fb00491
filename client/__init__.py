"""The Flower ClientApp and what it is made of."""
