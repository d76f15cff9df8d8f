"""The server's own evaluation of each global adapter, and sample answers (causal LM).

One peft model per rank (FLoRA's stacks change rank every round), each built from the
cached base once; a strategy's base delta (FLoRA's merged stacks) is applied first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from torch.utils.data import TensorDataset

from fedlora.config import CAUSAL_LM, RunConfig
from fedlora.data.instruct import RESPONSE, TEXT, last_user_content
from fedlora.lora.state import AdapterState
from fedlora.model.device import Placement
from fedlora.model.lm import generate_answers
from fedlora.model.models import (
    BaseLoading,
    apply_base_delta,
    build_lora_model,
    load_tokenizer,
    lora_spec,
)
from fedlora.model.peft_state import load_into_peft
from fedlora.model.train import EvalResult, evaluate
from fedlora.run import results


class ServerEvaluator:
    """Evaluates global adapters on the server's held-out data, at any rank.

    One peft model per rank (FLoRA's stacks change rank every round), each built from the
    cached base once. A strategy's base delta (FLoRA's merged stacks) is applied to the
    base weights first.
    """

    def __init__(self, cfg: RunConfig, num_labels: int, data: TensorDataset) -> None:
        self.cfg, self.num_labels, self.data = cfg, num_labels, data
        self.placement = Placement.resolve(cfg.device, cfg.precision)
        self.loading = BaseLoading(self.placement, cfg.base_quantization)
        self._models: dict[int, tuple[PeftModel, dict]] = {}

    def model_for(self, state: AdapterState, base_delta: Mapping | None = None) -> PeftModel:
        """A peft model at ``state``'s rank holding ``state`` on top of ``base_delta``."""
        rank = state.rank
        if rank not in self._models:
            spec = lora_spec(self.cfg).with_rank(rank)
            model = build_lora_model(
                self.cfg.model, self.num_labels, spec, seed=self.cfg.seed, loading=self.loading
            )
            self._models[rank] = (model, {})
        model, originals = self._models[rank]
        if base_delta or originals:
            apply_base_delta(model, dict(base_delta or {}), originals)
        load_into_peft(model, state)
        return model

    def forget(self, rank: int) -> None:
        """Drop the cached model of ``rank`` (after it was merged and unloaded)."""
        self._models.pop(rank, None)

    def __call__(self, state: AdapterState, base_delta: Mapping | None = None) -> EvalResult:
        """Loss and accuracy of ``state`` (on ``base_delta``) on the held-out data."""
        model = self.model_for(state, base_delta)
        return evaluate(
            model, self.data, self.cfg.eval_batch_size, desc="server eval", placement=self.placement
        )


class SampleWriter:
    """Greedy answers of the global model to a few held-out prompts (causal LM only)."""

    def __init__(self, cfg: RunConfig, out: Path, frame: pd.DataFrame, count: int = 4) -> None:
        self.cfg, self.out = cfg, out
        self.frame = frame.head(count) if cfg.task == CAUSAL_LM else frame.head(0)
        self.answers: dict[str, list[str]] = {}

    def record(self, stage: str, model: torch.nn.Module) -> None:
        """Generate for ``stage`` and rewrite ``samples.md``."""
        if self.frame.empty:
            return
        tokenizer = load_tokenizer(self.cfg.model, self.cfg.task)
        self.answers[stage] = generate_answers(
            model, tokenizer, list(self.frame[TEXT]), self.cfg.max_seq_len
        )
        results.write_samples(
            self.out,
            [last_user_content(p) for p in self.frame[TEXT]],
            list(self.frame[RESPONSE]),
            self.answers,
        )
