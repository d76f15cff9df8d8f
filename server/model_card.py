"""An exported adapter that describes itself: labels, tokenizer, a portable base, a model card.

peft's ``save_pretrained`` writes the factors and an empty model-card template, with the
base model as the absolute path it was loaded from. A user who opens the folder (or
pushes it to the Hub) needs more: which base it belongs to, the label names a classifier
predicts, the tokenizer, how it was trained and how well it did. All of it is written
here, next to peft's files, after the final adapter is saved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import CAUSAL_LM, EMBEDDED_MODEL, RunConfig
from fedlora.model.models import load_tokenizer, resolve_model_path
from fedlora.run import results
from fedlora.run.predict import INFO_FILE

# the embedded encoder is sentence-transformers/all-MiniLM-L6-v2, byte for byte (its asset
# package says so); the embedded decoder is SmolLM2 de-quantised from a Q4_1 GGUF file,
# which is not the Hub's float checkpoint, so it keeps its local path
EMBEDDED_HUB_IDS = {"sequence-classification": "sentence-transformers/all-MiniLM-L6-v2"}


def portable_base(cfg: RunConfig) -> str:
    """The base model as another machine can name it: a hub id where there is one."""
    if cfg.model == EMBEDDED_MODEL and cfg.task in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[cfg.task]
    if cfg.model == EMBEDDED_MODEL:  # the converted decoder's folder on this machine
        return resolve_model_path(cfg.model, cfg.task)
    path = Path(cfg.model).expanduser()
    return str(path.resolve()) if path.exists() else cfg.model


def describe_adapter(
    folder: Path,
    cfg: RunConfig,
    label_names: Sequence[str],
    records: Sequence[Mapping[str, Any]],
) -> None:
    """Write the tokenizer, ``fedlora.json``, a model card, and a portable base reference."""
    load_tokenizer(cfg.model, cfg.task).save_pretrained(folder)
    base = portable_base(cfg)
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    final = next((r for r in reversed(records) if r.get("eval_accuracy") is not None), {})
    info = {
        "task": cfg.task,
        "base_model": base,
        "model": cfg.model,  # as the run named it (``embedded`` resolves without network)
        "labels": list(label_names),
        "strategy": cfg.strategy,
        "rounds": cfg.num_server_rounds,
        "final_accuracy": final.get("eval_accuracy"),
        "final_loss": final.get("eval_loss"),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(model_card(cfg, base, label_names, records))


def model_card(
    cfg: RunConfig, base: str, labels: Sequence[str], records: Sequence[Mapping[str, Any]]
) -> str:
    """A Hub model card: metadata, how it was trained, its results, how to load it."""
    classify = cfg.task != CAUSAL_LM
    auto = "AutoPeftModelForSequenceClassification" if classify else "AutoPeftModelForCausalLM"
    id2label = {i: name for i, name in enumerate(labels)}
    extra = f", num_labels={len(labels)}, id2label={id2label!r}" if classify else ""
    hub_base = not Path(base).is_absolute()  # a local path is no Hub metadata (and private)
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {base}"] if hub_base else []),
        "tags: [fedlora, flower, federated-learning, lora]",
        "---",
        "",
        f"# LoRA adapter for {base}, trained with federated learning",
        "",
        f"Trained by fedlora on Flower: {cfg.strategy} over "
        f"{cfg.num_server_rounds} rounds, {cfg.clients_per_round} of {cfg.num_partitions} "
        f"clients per round, {cfg.local_steps} local steps of batch {cfg.batch_size}, "
        f"LoRA r={cfg.lora_rank}, alpha={cfg.lora_alpha}, dataset {cfg.dataset} "
        f"({cfg.partitioner} split){', client DP-SGD' if cfg.dp else ''}.",
        "",
    ]
    if classify:
        lines += [f"Labels ({len(labels)}): {', '.join(labels)}.", ""]
    lines += [
        "## Use",
        "",
        "```python",
        f"from peft import {auto}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("PATH/TO/THIS/FOLDER"{extra})',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        'or, with fedlora installed: `fedlora predict PATH/TO/THIS/FOLDER "some text"`.',
        "",
        "## Results (server-side evaluation per round)"
        if not any(r.get("eval_source") == "federated" for r in records)
        else "## Results (rounds 1+: federated evaluation, each node with its own lora_B)",
        "",
        results.summary_table(records),
        "",
    ]
    return "\n".join(lines)
