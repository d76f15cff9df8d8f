"""The Flower ClientApp and the local training job."""
