"""The Flower ServerApp and its federation loop."""
