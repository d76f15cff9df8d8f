"""LoRA adapters as plain data and the math on them: numpy only, no torch, no Flower."""
