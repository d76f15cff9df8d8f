"""The layout of a LoRA adapter: rank, alpha, targets and the scaling rule (peft's, in numbers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

AUTO_TARGETS = "auto"
"""``lora-targets = auto``: the attention projections of a decoder, else peft's default."""
CLASSIFY, CAUSAL_LM = "sequence-classification", "causal-lm"
TASKS = (CLASSIFY, CAUSAL_LM)
"""What a run trains: an encoder with a classification head, or a decoder on responses."""


@dataclass(frozen=True)
class LoraSpec:
    """The peft side of a run: which modules get LoRA, at which rank and scaling."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False
    task: str = CLASSIFY

    @property
    def scaling(self) -> float:
        """The factor s in dW = s B A, as peft computes it."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def with_rank(self, rank: int) -> LoraSpec:
        """Same adapter at another rank (heterogeneous clients)."""
        return dataclasses.replace(self, rank=rank)
