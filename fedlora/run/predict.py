"""``fedlora predict``: an exported adapter's answers to texts, for a quick look.

Reads what the export wrote beside peft's files (``fedlora.json``: the task, the base as
the run named it, the label names), so the embedded base resolves without network and a
classifier's predictions come out as label names, not ``LABEL_3``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from fedlora.config import CAUSAL_LM, ConfigError
from fedlora.lora.spec import CLASSIFY

INFO_FILE = "fedlora.json"


@dataclass(frozen=True)
class Prediction:
    """One text's answer: a label and its probability, or a generated answer."""

    text: str
    answer: str
    probability: float | None = None


def load_adapter(folder: Path) -> tuple[PeftModel, object, dict]:
    """The adapter on its base, the tokenizer saved with it, and the export's description."""
    from fedlora.model.models import load_base_model

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"Invalid adapter folder {str(folder)!r}: no adapter_config.json")
    info_path = folder / INFO_FILE
    adapter_config = json.loads(config_path.read_text())
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    task = info.get("task") or (
        CAUSAL_LM if adapter_config.get("task_type") == "CAUSAL_LM" else CLASSIFY
    )
    labels = info.get("labels") or []
    base = load_base_model(
        info.get("model") or adapter_config["base_model_name_or_path"], len(labels) or 2, task
    )
    model = PeftModel.from_pretrained(base, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, info | {"task": task, "labels": labels}


@torch.no_grad()
def predict(folder: Path, texts: list[str], max_len: int = 256) -> list[Prediction]:
    """The adapter's label (classifier) or greedy answer (causal LM) for each text."""
    model, tokenizer, info = load_adapter(folder)
    if info["task"] == CAUSAL_LM:
        from fedlora.data.instruct import user_turn
        from fedlora.model.lm import generate_answers

        answers = generate_answers(model, tokenizer, [user_turn(t) for t in texts], max_len)
        return [Prediction(t, a) for t, a in zip(texts, answers, strict=True)]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    probs = torch.softmax(model(**batch).logits.float(), dim=-1)
    best = probs.argmax(dim=-1).tolist()
    labels = info["labels"]
    return [
        Prediction(t, labels[i] if i < len(labels) else f"label {i}", float(probs[k, i]))
        for k, (t, i) in enumerate(zip(texts, best, strict=True))
    ]
