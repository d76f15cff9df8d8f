"""fedlora: federated LoRA fine-tuning on Flower (the library: config, model, data, math)."""

__version__ = "0.1.0"
