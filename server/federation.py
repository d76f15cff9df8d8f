"""The server side of a run: config -> strategy -> rounds -> evaluation -> records -> results.

:func:`run_federation` is the whole run. Its round loop mirrors Flower's
``Strategy.start`` (configure, send and receive, aggregate, evaluate) around the Flower
strategy that owns the round (:class:`~fedlora.server.flower_strategy.LoraFlowerStrategy`,
wrapped by central DP when asked), and adds what a LoRA run needs: the server's own
evaluation of every global adapter, one record per round built from Flower's
MetricRecord and the round's report, and the callbacks (records, tracking, checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation's Grid

from fedlora.config import CAUSAL_LM, ConfigError, RunConfig
from fedlora.config.settings import parse_settings
from fedlora.data.tables import (
    TextTable,
    eval_subset,
    evaluation_rows,
    load_table,
    most_common_share,
    partition,
    tokenize,
)
from fedlora.model.models import build_lora_model, load_tokenizer, lora_spec
from fedlora.model.peft_state import state_from_peft
from fedlora.model.train import EvalResult
from fedlora.run import results
from fedlora.run.preflight import adapted_layers, check_rank_fits
from fedlora.run.registry import check_run_strategy
from fedlora.run.tracking import Tracker, make_tracker
from fedlora.server.callbacks import Checkpointer, RecordWriter, RoundCallback
from fedlora.server.central_dp import CentralDP
from fedlora.server.evaluation import SampleWriter, ServerEvaluator
from fedlora.server.export import export_adapter
from fedlora.server.flower_strategy import LoraFlowerStrategy, RoundOptions
from fedlora.server.messaging import check_reply_poll, send_and_collect
from fedlora.server.model_card import describe_adapter
from fedlora.server.outputs import NOT_PRIVATE, prepare_output, resume, write_summary
from fedlora.server.reports import training_record
from fedlora.server.weights import WeightPolicy
from fedlora.strategies.api import LoraStrategy, logger
from fedlora.wire import protocol


class StrategyFailedError(RuntimeError):
    """The strategy failed in too many rounds; the run stops rather than go on corrupted."""


class RunFailedError(RuntimeError):
    """Every round was skipped: the run produced nothing, and must not say it completed."""


def build_strategy(cfg: RunConfig) -> LoraStrategy:
    """The configured strategy, with its own settings parsed from ``strategy-options``."""
    cls = check_run_strategy(cfg)
    settings = parse_settings(cls.Settings, cfg.strategy_extra, cls.name or cfg.strategy)
    try:
        return cls(lora_spec(cfg), seed=cfg.seed, settings=settings)
    except ValueError as err:  # a strategy's own check of its settings
        raise ConfigError(str(err)) from None


def round_options(cfg: RunConfig) -> RoundOptions:
    """How the server runs each round, from the run configuration."""
    return RoundOptions(
        clients_per_round=cfg.clients_per_round,
        min_replies=cfg.min_replies,
        weights=WeightPolicy(cfg.weighting, cfg.max_weight_share, cfg.max_claim_ratio),
        seed=cfg.seed,
        fraction_evaluate=cfg.fraction_evaluate,
        node_wait_timeout=cfg.round_timeout,
        uplink=cfg.uplink,
        downlink=cfg.downlink,
        max_message_bytes=cfg.max_message_bytes,
        flower_numpy=cfg.central_dp != "off",
        server_optimizer=cfg.server_optimizer_spec,
    )


def check_partitions(cfg: RunConfig, table: TextTable) -> None:
    """Fail before any training if the data cannot be split as configured.

    Every node also partitions the held-out rows it evaluates on, which are fewer: a split
    that works for training can still leave a node none of them.
    """
    partition(table.train, cfg.data, 0, cfg.num_partitions)
    held_out = evaluation_rows(table, cfg.eval_split)
    partition(held_out, cfg.data, 0, cfg.num_partitions, split=f"held-out ({cfg.eval_split})")


def evaluation_record(server_round: int, ev: EvalResult, task: str) -> dict[str, Any]:
    """The server-side evaluation part of a round's record."""
    record: dict[str, Any] = {
        "round": server_round,
        "eval_accuracy": ev.accuracy,
        "eval_loss": ev.loss,
        "eval_examples": ev.num_examples,
    }
    if task == CAUSAL_LM:
        record["eval_perplexity"] = math.exp(min(ev.loss, 700.0)) if ev.loss == ev.loss else None
    return record


FEDERATED_SOURCE = "federated"
"""A round record's ``eval_source`` when its eval numbers are the federated evaluation's."""


def federated_result(fed_eval: dict[str, float]) -> EvalResult:
    """The federated evaluation as the round's result (NaN when no node's reply was usable).

    For a strategy with personal factors (FedSA-LoRA): each node evaluated the global A
    with its own B on its own test split; the server's adapter has no B to evaluate.
    """
    nan = float("nan")
    return EvalResult(
        loss=fed_eval.get(protocol.EVAL_LOSS, nan),
        accuracy=fed_eval.get(protocol.EVAL_ACCURACY, nan),
        num_examples=int(fed_eval.get("num-examples", 0)),
    )


@dataclass
class Federation:
    """The parts of one run, built once; :meth:`train_round` runs one round with them."""

    cfg: RunConfig
    out: Path
    flower: LoraFlowerStrategy
    driver: Strategy  # the Flower strategy the loop calls: ``flower``, or central DP around it
    evaluator: ServerEvaluator
    samples: SampleWriter
    base_config: ConfigRecord
    arrays: ArrayRecord
    callbacks: Sequence[RoundCallback]
    modules: str = ""  # the modules that received LoRA, for the summary
    done: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def strategy(self) -> LoraStrategy:
        """The LoRA strategy (its math)."""
        return self.flower.strategy

    def train_round(self, grid: Grid, server_round: int) -> None:
        """One round: configure, train, aggregate, evaluate, record, checkpoint."""
        cfg, started, clock = self.cfg, time.monotonic(), _PhaseClock()
        messages = self.driver.configure_train(server_round, self.arrays, self._config(), grid)
        clock.lap("configure")
        if cfg.secure_aggregation != "off":  # stages around training; the sum aggregated
            arrays, metrics = self.flower.train_secure(
                grid, server_round, cfg.secagg_params, cfg.round_timeout
            )
            clock.lap("train")
        else:
            replies = send_and_collect(grid, messages, cfg.round_timeout)
            clock.lap("train")
            arrays, metrics = self.driver.aggregate_train(server_round, replies)
        self.arrays = self.arrays if arrays is None else arrays
        state = self.flower.global_state(self.arrays)
        clock.lap("aggregate")
        fed_eval = self._federated_evaluation(grid, server_round)
        clock.lap("federated_eval")
        personal = self.strategy.personal_factors  # no model on its own: the nodes evaluate
        ev = (
            federated_result(fed_eval)
            if personal
            else self.evaluator(state, self.strategy.base_delta())
        )
        clock.lap("evaluate")
        report = self.flower.reports[server_round]
        numbers = dict(metrics or {})
        record = evaluation_record(server_round, ev, cfg.task) | training_record(report, numbers)
        if personal:
            record["eval_source"] = FEDERATED_SOURCE
        if fed_eval:
            record["federated_eval"] = fed_eval
        discover = float(report.metrics.get("discover-seconds", 0.0))
        record["seconds"] = time.monotonic() - started
        record["phase_seconds"] = {"discover": discover} | clock.laps
        record["phase_seconds"]["configure"] -= discover
        for callback in self.callbacks:
            callback(server_round, record, state)
        if report.strategy_error:
            self._count_failure(server_round, report.strategy_error)
        logger.log(
            INFO,
            "Round %d/%d: accuracy %.4f, eval loss %.4f, train loss %s, agg. error %s, %.1fs",
            server_round,
            cfg.num_server_rounds,
            ev.accuracy,
            ev.loss,
            _number(record.get("train_loss"), ".4f"),
            _number(record.get("aggregation_error"), ".2e"),
            record["seconds"],
        )

    def _config(self) -> ConfigRecord:
        return ConfigRecord(dict(self.base_config))

    def _federated_evaluation(self, grid: Grid, server_round: int) -> dict[str, float]:
        messages = list(
            self.driver.configure_evaluate(server_round, self.arrays, self._config(), grid)
        )
        if not messages:
            return {}
        replies = send_and_collect(grid, messages, self.cfg.round_timeout)
        agg = self.driver.aggregate_evaluate(server_round, replies)
        return {} if agg is None else {k: float(v) for k, v in agg.items()}

    def _count_failure(self, server_round: int, error: str) -> None:
        self.failures.append(f"round {server_round}: {error}")
        if len(self.failures) >= self.cfg.max_failed_rounds:
            raise StrategyFailedError(
                f"Strategy {self.cfg.strategy!r} failed in {len(self.failures)} rounds "
                f"(max-failed-rounds={self.cfg.max_failed_rounds}); the global adapter was kept "
                f"unchanged each time. Failures: {'; '.join(self.failures)}"
            )


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round of a federated LoRA fine-tuning; return the output folder."""
    started = time.monotonic()
    check_simulated_federation(grid, cfg)
    check_reply_poll(grid)
    out = prepare_output(cfg)
    tracker = make_tracker(cfg.tracking, out, json.loads(cfg.to_json()))
    if cfg.dp and cfg.dp_reproducible_noise:
        logger.log(WARNING, "fedlora: %s", NOT_PRIVATE)
    try:
        run = _setup(cfg, out, tracker)
        run.driver.summary()
        for server_round in range(run.done + 1, cfg.num_server_rounds + 1):
            try:
                run.train_round(grid, server_round)
            except StrategyFailedError:
                write_summary(out, cfg, started, {"stopped": "strategy failed"})
                raise
        _finish(run, started)
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()
    logger.log(INFO, "fedlora: run finished; summary in %s", out / results.SUMMARY_FILE)
    return out


def check_simulated_federation(grid: Grid, cfg: RunConfig, settle: float = 30.0) -> None:
    """A simulation's nodes all register at once: refuse a sample they cannot fill.

    A deployment's nodes connect over time (the round waits for them); a simulation
    registers its ``num-supernodes`` together, soon after the ServerApp starts, and never
    adds one, so ``clients-per-round`` above that would wait out ``node-wait-timeout`` and
    then fail. Wait for the registration (up to ``settle`` s), then say so, naming both.
    """
    if not isinstance(grid, InMemoryGrid):
        return
    deadline, seen, stable_since = time.monotonic() + settle, -1, time.monotonic()
    while time.monotonic() < deadline:
        nodes = len(grid.get_node_ids())
        if nodes != seen:
            seen, stable_since = nodes, time.monotonic()
        elif nodes > 0 and time.monotonic() - stable_since >= 1.0:
            break
        time.sleep(0.1)
    if 0 < seen < cfg.clients_per_round:
        raise ConfigError(
            f"Invalid value for 'clients-per-round': {cfg.clients_per_round} exceeds the "
            f"simulation's {seen} nodes (options.num-supernodes); lower it or add nodes"
        )


def _setup(cfg: RunConfig, out: Path, tracker: Tracker) -> Federation:
    """Data, strategy, Flower strategy, evaluator, the first global adapter (or the resumed one)."""
    table = load_table(cfg.data)
    check_partitions(cfg, table)
    strategy = build_strategy(cfg)
    flower = LoraFlowerStrategy(strategy, round_options(cfg))
    # configure_train and aggregate_train go through Flower's DP wrapper when asked
    driver: Strategy = CentralDP(flower, cfg, out) if cfg.central_dp != "off" else flower
    # Flower processes inherit OMP_NUM_THREADS=1 (clients share the cores); the server
    # evaluates while clients are idle, so it may use all of them.
    torch.set_num_threads(int(os.environ.get("FEDLORA_SERVER_THREADS", os.cpu_count() or 1)))
    spec = lora_spec(cfg)
    fresh = build_lora_model(cfg.model, table.num_labels, spec, seed=cfg.seed)
    check_rank_fits(adapted_layers(fresh), cfg.lora_rank)
    state = strategy.initial_state(state_from_peft(fresh, spec.scaling))
    eval_frame = eval_subset(evaluation_rows(table, cfg.eval_split), cfg.eval_examples, cfg.seed)
    eval_data = tokenize(eval_frame, load_tokenizer(cfg.model, cfg.task), cfg.max_seq_len, cfg.task)
    evaluator = ServerEvaluator(cfg, table.num_labels, eval_data)
    base_config = ConfigRecord(
        {protocol.RUN_CONFIG: cfg.to_json(), protocol.LABEL_NAMES: list(table.label_names)}
    )
    samples = SampleWriter(cfg, out, eval_frame)
    callbacks = [RecordWriter(out, tracker), Checkpointer(out, cfg, evaluator, flower)]
    done = 0
    if cfg.resume:
        resumed = resume(out, cfg)
        done, state = resumed.round, resumed.state
        flower.load_state_dict(resumed.server_state)
    else:
        samples.record("before training", evaluator.model_for(state))
        t0 = time.monotonic()
        ev = evaluator(state)
        record = evaluation_record(0, ev, cfg.task) | {
            "seconds": time.monotonic() - t0,
            # what always giving the most common answer would score on the same examples
            "most_common_answer": most_common_share(eval_frame, cfg.task),
        }
        callbacks[0](0, record, state)  # round 0 is recorded, not checkpointed
        logger.log(INFO, "Round 0: accuracy %.4f, loss %.4f", ev.accuracy, ev.loss)
    modules = ",".join(sorted(fresh.peft_config["default"].target_modules))
    arrays = flower.to_record(state)
    return Federation(
        cfg, out, flower, driver, evaluator, samples, base_config, arrays, callbacks, modules, done
    )


def _finish(run: Federation, started: float) -> None:
    """Fail a run that aggregated nothing; else export the adapter and write the summary."""
    cfg, out, strategy = run.cfg, run.out, run.strategy
    records = results.read_records(out)
    if not [r for r in records if r["round"] > 0 and not r["skipped"]]:
        reasons = sorted({str(r.get("skip_reason")) for r in records[1:]})
        why = f"no round aggregated anything ({'; '.join(reasons) or 'no rounds ran'})"
        write_summary(out, cfg, started, {"status": f"**FAILED: {why}**"})
        raise RunFailedError(f"fedlora: the run failed: {why}")
    state = run.flower.global_state(run.arrays)
    if not strategy.personal_factors:  # the server's adapter alone would answer as the base
        run.samples.record("after training", run.evaluator.model_for(state, strategy.base_delta()))
    export = export_adapter(out, cfg, run.evaluator, state, strategy)
    labels = [str(x) for x in run.base_config.get(protocol.LABEL_NAMES, [])]
    describe_adapter(out / "adapter", cfg, labels, results.read_records(out))
    extra: dict[str, str] = {"LoRA modules": run.modules, **export}
    if strategy.personal_factors:
        extra["accuracy"] = (
            "round 0: the server's evaluation of the initial adapter (B = 0 on every node); "
            "rounds 1+: federated evaluation, each node the global A with its own B on its "
            "own test split (the strategy keeps B on the nodes)"
        )
    if isinstance(run.driver, CentralDP):
        extra["central DP"] = run.driver.describe()
    excluded = run.flower.nodes.excluded
    if excluded:
        extra["excluded nodes"] = "; ".join(f"{n}: {r}" for n, r in excluded.items())
    write_summary(out, cfg, started, extra)


def _number(value: Any, spec: str) -> str:
    """A metric for a log line: formatted, or '-' when the round has none."""
    return "-" if not isinstance(value, int | float) else format(value, spec)


class _PhaseClock:
    """Seconds spent in each phase of a round, for the results (where the time goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.laps[phase] = now - self._last
        self._last = now
