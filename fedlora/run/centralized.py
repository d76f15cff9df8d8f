"""The centralised reference: one LoRA model trained on the pooled data, same budget.

"Same budget" means the same number of optimizer steps of the same batch size as the
whole federation takes (rounds x clients per round x local steps), the same model,
LoRA layout, learning rate and held-out evaluation set. It is the ceiling that
federated accuracy is reported against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedlora.config import RunConfig
from fedlora.data.tables import eval_subset, evaluation_rows, load_table, tokenize
from fedlora.model.models import build_lora_model, load_tokenizer, lora_spec
from fedlora.model.train import evaluate, make_optimizer, sampled_loader, train_steps


@dataclass(frozen=True)
class CentralizedResult:
    """Accuracy of the pooled-data run and what it cost."""

    accuracy: float
    loss: float
    steps: int
    seconds: float


def run_centralized(cfg: RunConfig, show_progress: bool = True) -> CentralizedResult:
    """Train on all training data for the federation's total step budget, then evaluate."""
    table = load_table(cfg.data)
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    spec = lora_spec(cfg)
    model = build_lora_model(cfg.model, table.num_labels, spec, seed=cfg.seed)
    steps = cfg.num_server_rounds * cfg.clients_per_round * cfg.local_steps
    train_data = tokenize(table.train, tokenizer, cfg.max_seq_len, cfg.task)
    test_data = tokenize(
        eval_subset(evaluation_rows(table, cfg.eval_split), cfg.eval_examples, cfg.seed),
        tokenizer,
        cfg.max_seq_len,
        cfg.task,
    )
    loader = sampled_loader(train_data, cfg.batch_size, steps, cfg.seed)
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        train_steps(
            model,
            make_optimizer(model, cfg.lr),
            loader,
            desc="centralised",
            show_progress=show_progress,
        )
    seconds = time.perf_counter() - started
    ev = evaluate(model, test_data, cfg.eval_batch_size, show_progress=show_progress)
    return CentralizedResult(ev.accuracy, ev.loss, steps, seconds)
