"""The server side of a run: config -> strategy -> rounds -> evaluation -> checkpoints -> results.

The round loop mirrors Flower's ``Strategy.start`` (configure, send and receive,
aggregate, evaluate) and adds what a LoRA run needs around it: the server-side
evaluation of every global adapter on held-out data, one JSONL record per round, a
PEFT-format checkpoint per round, and the summary table and plot at the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from peft import PeftModel
from torch.utils.data import TensorDataset

from fedlora import protocol, results
from fedlora.adapters import AdapterState, load_into_peft, state_from_peft, to_arrayrecord
from fedlora.checkpoint import save_checkpoint
from fedlora.config import ConfigError, RunConfig
from fedlora.data import TextTable, eval_subset, load_table, partition, tokenize
from fedlora.model import LoraSpec, build_lora_model, load_tokenizer
from fedlora.registry import load_strategy_class
from fedlora.train import EvalResult, evaluate
from strategies.base import LoraStrategy, RoundReport, StrategyOptions


def lora_spec(cfg: RunConfig) -> LoraSpec:
    """The global adapter's layout from the run config."""
    return LoraSpec(
        cfg.lora_rank, cfg.lora_alpha, tuple(cfg.target_modules), cfg.lora_dropout, cfg.use_rslora
    )


def build_strategy(cfg: RunConfig, extra: dict[str, Any] | None = None) -> LoraStrategy:
    """Instantiate the configured strategy; it must be a :class:`LoraStrategy`."""
    cls = load_strategy_class(cfg.strategy)
    if not (isinstance(cls, type) and issubclass(cls, LoraStrategy)):
        raise ConfigError(
            f"Invalid value for 'strategy': {cfg.strategy!r} resolves to {cls!r}, which is not "
            "a subclass of strategies.base.LoraStrategy"
        )
    if any(r != cfg.lora_rank for r in cfg.client_rank_list) and not cls.heterogeneous_ranks:
        raise ConfigError(
            f"Invalid value for 'client-ranks': {cfg.client_ranks!r}, but strategy "
            f"{cfg.strategy!r} does not support heterogeneous ranks"
        )
    options = StrategyOptions(
        lora=lora_spec(cfg),
        clients_per_round=cfg.clients_per_round,
        min_replies=cfg.min_replies,
        weighting=cfg.weighting,
        seed=cfg.seed,
        fraction_evaluate=cfg.fraction_evaluate,
        node_wait_timeout=cfg.round_timeout,
        extra=dict(extra or {}),
    )
    return cls(options)


@dataclass
class ServerEvaluator:
    """Evaluates global adapters on the server's held-out data."""

    model: PeftModel
    data: TensorDataset
    batch_size: int

    def __call__(self, state: AdapterState) -> EvalResult:
        """Load ``state`` into the server's model and evaluate it."""
        load_into_peft(self.model, state)
        return evaluate(self.model, self.data, self.batch_size, desc="server eval")


def check_partitions(cfg: RunConfig, table: TextTable) -> None:
    """Fail before any training if the data cannot be split as configured."""
    if cfg.num_partitions > len(table.train):
        raise ConfigError(
            f"Invalid value for 'num-partitions': {cfg.num_partitions} exceeds the "
            f"{len(table.train)} training examples"
        )
    partition(table.train, cfg, 0, cfg.num_partitions)


def round_record(
    server_round: int, report: RoundReport | None, ev: EvalResult, fed_eval: dict[str, float]
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``."""
    record: dict[str, Any] = {
        "round": server_round,
        "eval_accuracy": ev.accuracy,
        "eval_loss": ev.loss,
        "eval_examples": ev.num_examples,
    }
    if report is not None:
        record |= {
            "num_sampled": len(report.sampled),
            "num_ok": report.num_ok,
            "skipped": report.skipped,
            "skip_reason": report.skip_reason,
            "strategy_error": report.strategy_error,
            "aggregation_error": None if report.skipped else report.aggregation_error,
            "train_loss": report.metrics.get(protocol.TRAIN_LOSS),
            "train_loss_first": report.metrics.get(protocol.TRAIN_LOSS_FIRST),
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "metrics": {k: v for k, v in report.metrics.items()},
            "nodes": [
                {
                    "node_id": o.node_id,
                    "status": o.status,
                    "reason": o.reason,
                    "num_examples": o.num_examples,
                    "bytes_up": o.bytes_up,
                    "bytes_down": o.bytes_down,
                    "train_loss": o.metrics.get(protocol.TRAIN_LOSS),
                    "train_seconds": o.metrics.get(protocol.TRAIN_SECONDS),
                }
                for o in report.outcomes
            ],
        }
    if fed_eval:
        record["federated_eval"] = fed_eval
    return record


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round of a federated LoRA fine-tuning; return the output folder."""
    started = time.monotonic()
    out = Path(cfg.output_dir).expanduser().resolve()
    if (out / results.ROUNDS_FILE).exists():
        raise ConfigError(
            f"Invalid value for 'output-dir': {str(out)!r} already holds a run "
            f"({results.ROUNDS_FILE}); choose another folder or delete it"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(cfg.to_json())
    log(INFO, "fedlora: writing results to %s", out)

    table = load_table(cfg)
    check_partitions(cfg, table)
    strategy = build_strategy(cfg)
    spec = lora_spec(cfg)
    model = build_lora_model(cfg.model, table.num_labels, spec, seed=cfg.seed)
    # Flower processes inherit OMP_NUM_THREADS=1 (clients share the cores); the server
    # evaluates while clients are idle, so it may use all of them.
    torch.set_num_threads(int(os.environ.get("FEDLORA_SERVER_THREADS", os.cpu_count() or 1)))
    state = strategy.initial_state(state_from_peft(model, spec.scaling))
    evaluator = ServerEvaluator(
        model,
        tokenize(
            eval_subset(table.test, cfg.eval_examples, cfg.seed),
            load_tokenizer(cfg.model),
            cfg.max_seq_len,
        ),
        cfg.eval_batch_size,
    )
    base_config = ConfigRecord(
        {protocol.RUN_CONFIG: cfg.to_json(), protocol.LABEL_NAMES: list(table.label_names)}
    )
    arrays: ArrayRecord = to_arrayrecord(state.to_state_dict())

    t0 = time.monotonic()
    ev = evaluator(state)
    record = round_record(0, None, ev, {})
    record["seconds"] = time.monotonic() - t0
    results.append_record(out, record)
    log(INFO, "Round 0: accuracy %.4f, loss %.4f", ev.accuracy, ev.loss)

    strategy.summary()
    for server_round in range(1, cfg.num_server_rounds + 1):
        t0 = time.monotonic()
        strategy.discover_nodes(grid, ConfigRecord(dict(base_config)), cfg.round_timeout)
        messages = strategy.configure_train(
            server_round, arrays, ConfigRecord(dict(base_config)), grid
        )
        replies = grid.send_and_receive(list(messages), timeout=cfg.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        report = strategy.last_report
        if new_arrays is not None:
            arrays = new_arrays
        state = strategy.global_state(arrays)
        fed_eval: dict[str, float] = {}
        eval_messages = list(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(base_config)), grid)
        )
        if eval_messages:
            agg = strategy.aggregate_evaluate(
                server_round, grid.send_and_receive(eval_messages, timeout=cfg.round_timeout)
            )
            fed_eval = {} if agg is None else {k: float(v) for k, v in agg.items()}
        ev = evaluator(state)
        record = round_record(server_round, report, ev, fed_eval)
        record["seconds"] = time.monotonic() - t0
        results.append_record(out, record)
        save_checkpoint(
            out / "checkpoints" / f"round-{server_round:04d}",
            model,
            state,
            {
                "round": server_round,
                "strategy": cfg.strategy,
                "strategy_state": strategy.state_dict(),
                "run_config": cfg.to_mapping(),
            },
        )
        if report is not None and report.skipped:
            log(WARNING, "Round %d skipped: %s", server_round, report.skip_reason)
        log(
            INFO,
            "Round %d/%d: accuracy %.4f, eval loss %.4f, train loss %s, agg. error %s, %.1fs",
            server_round,
            cfg.num_server_rounds,
            ev.accuracy,
            ev.loss,
            record.get("train_loss"),
            record.get("aggregation_error"),
            record["seconds"],
        )

    final = out / "adapter"
    save_checkpoint(
        final,
        model,
        state,
        {"round": cfg.num_server_rounds, "strategy": cfg.strategy, "run_config": cfg.to_mapping()},
    )
    records = results.read_records(out)
    header = {
        "strategy": cfg.strategy,
        "model": cfg.model,
        "dataset": f"{cfg.dataset} ({cfg.partitioner}, alpha={cfg.dirichlet_alpha}, "
        f"{cfg.num_partitions} partitions)",
        "rounds": cfg.num_server_rounds,
        "clients per round": cfg.clients_per_round,
        "LoRA": f"r={cfg.lora_rank}, alpha={cfg.lora_alpha}, targets={cfg.lora_targets}",
        "adapter": str(final),
        "total wall time (s)": f"{time.monotonic() - started:.1f}",
    }
    results.write_summary(out, records, header)
    results.plot_rounds(out, records, title=f"{cfg.strategy} on {cfg.dataset}")
    log(INFO, "fedlora: run finished; summary in %s", out / results.SUMMARY_FILE)
    return out
