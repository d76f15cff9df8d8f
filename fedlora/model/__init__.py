"""Models on a device: loading and LoRA injection with peft, the training and evaluation loops."""
