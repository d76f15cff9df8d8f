"""FlexLoRA as a fedlora strategy plugin (written against ``fedlora.strategies.api`` only)."""

from fedlora_flexlora.strategy import FlexLora

__all__ = ["FlexLora"]
