"""FlexLoRA as a fedlora strategy plugin (written against ``strategies.base`` only)."""

from fedlora_flexlora.strategy import FlexLora

__all__ = ["FlexLora"]
