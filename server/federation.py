"""The server side of a run: config -> strategy -> rounds -> evaluation -> checkpoints -> results.

The round loop mirrors Flower's ``Strategy.start`` (configure, send and receive,
aggregate, evaluate) and adds what a LoRA run needs around it: the server-side
evaluation of every global adapter on held-out data, one JSONL record per round, a
PEFT-format checkpoint per round, and the summary table and plot at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from peft import PeftModel
from torch.utils.data import TensorDataset

from fedlora.config import CAUSAL_LM, CLASSIFY, ConfigError, RunConfig
from fedlora.data.instruct import RESPONSE, TEXT, last_user_content
from fedlora.data.tables import TextTable, eval_subset, load_table, partition, tokenize
from fedlora.lora.lowrank import merge_product, truncated_svd
from fedlora.lora.state import AdapterState, LoraFactors
from fedlora.model.lm import generate_answers
from fedlora.model.models import apply_base_delta, build_lora_model, load_tokenizer, lora_spec
from fedlora.model.peft_state import load_into_peft, state_from_peft
from fedlora.model.train import EvalResult, evaluate
from fedlora.run import results
from fedlora.run.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.run.preflight import adapted_layers, check_rank_fits
from fedlora.run.registry import check_strategy_config
from fedlora.run.tracking import make_tracker
from fedlora.server.central_dp import CentralDP
from fedlora.strategies.base import LoraStrategy, RoundReport, StrategyOptions
from fedlora.wire import protocol
from fedlora.wire.records import to_arrayrecord


def build_strategy(cfg: RunConfig) -> LoraStrategy:
    """Instantiate the configured strategy; it must be a :class:`LoraStrategy`."""
    cls = check_strategy_config(
        cfg.strategy, cfg.strategy_extra, cfg.client_rank_list, cfg.lora_rank
    )
    options = StrategyOptions(
        lora=lora_spec(cfg),
        clients_per_round=cfg.clients_per_round,
        min_replies=cfg.min_replies,
        weighting=cfg.weighting,
        max_weight_share=cfg.max_weight_share,
        max_claim_ratio=cfg.max_claim_ratio,
        seed=cfg.seed,
        fraction_evaluate=cfg.fraction_evaluate,
        node_wait_timeout=cfg.round_timeout,
        uplink=cfg.uplink,
        downlink=cfg.downlink,
        max_message_bytes=cfg.max_message_bytes,
        flower_numpy=cfg.central_dp != "off",
        extra=cfg.strategy_extra,
    )
    try:
        return cls(options)
    except ValueError as err:  # a strategy's own check of its settings
        raise ConfigError(str(err)) from None


class ServerEvaluator:
    """Evaluates global adapters on the server's held-out data, at any rank.

    One peft model per rank (FLoRA's stacks change rank every round), each built from the
    cached base once. A strategy's base delta (FLoRA's merged stacks) is applied to the
    base weights first.
    """

    def __init__(self, cfg: RunConfig, num_labels: int, data: TensorDataset) -> None:
        self.cfg, self.num_labels, self.data = cfg, num_labels, data
        self._models: dict[int, tuple[PeftModel, dict]] = {}

    def model_for(self, state: AdapterState, base_delta: Mapping | None = None) -> PeftModel:
        """A peft model at ``state``'s rank holding ``state`` on top of ``base_delta``."""
        rank = state.rank
        if rank not in self._models:
            spec = lora_spec(self.cfg).with_rank(rank)
            model = build_lora_model(self.cfg.model, self.num_labels, spec, seed=self.cfg.seed)
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
        return evaluate(model, self.data, self.cfg.eval_batch_size, desc="server eval")


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


def check_partitions(cfg: RunConfig, table: TextTable) -> None:
    """Fail before any training if the data cannot be split as configured."""
    if cfg.num_partitions > len(table.train):
        raise ConfigError(
            f"Invalid value for 'num-partitions': {cfg.num_partitions} exceeds the "
            f"{len(table.train)} training examples"
        )
    partition(table.train, cfg, 0, cfg.num_partitions)


def round_record(
    server_round: int,
    report: RoundReport | None,
    ev: EvalResult,
    fed_eval: dict[str, float],
    task: str = CLASSIFY,
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``."""
    record: dict[str, Any] = {
        "round": server_round,
        "eval_accuracy": ev.accuracy,
        "eval_loss": ev.loss,
        "eval_examples": ev.num_examples,
    }
    if task == CAUSAL_LM:
        record["eval_perplexity"] = math.exp(min(ev.loss, 700.0)) if ev.loss == ev.loss else None
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
            "dense_up": report.dense_up,
            "dense_down": report.dense_down,
            "metrics": dict(report.metrics),
            "nodes": [
                {
                    "node_id": o.node_id,
                    "status": o.status,
                    "reason": o.reason,
                    "num_examples": o.num_examples,
                    "bytes_up": o.bytes_up,
                    "bytes_down": o.bytes_down,
                    "dense_up": o.dense_up,
                    "dense_down": o.dense_down,
                    "encode_seconds": o.metrics.get("encode-seconds"),
                    "train_loss": o.metrics.get(protocol.TRAIN_LOSS),
                    "train_seconds": o.metrics.get(protocol.TRAIN_SECONDS),
                    "process_seconds": o.metrics.get(protocol.PROCESS_SECONDS),
                    "handler_seconds": o.metrics.get(protocol.HANDLER_SECONDS),
                    "epsilon": o.metrics.get(protocol.EPSILON),
                    "weight": o.weight,
                }
                for o in report.outcomes
            ],
            "anomalies": [
                {"node_id": a.node_id, "claimed": a.claimed, "used": a.used, "reason": a.reason}
                for a in report.anomalies
            ],
        }
    if fed_eval:
        record["federated_eval"] = fed_eval
    return record


class _PhaseClock:
    """Seconds spent in each phase of a round, for the results (where the time goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.laps[phase] = now - self._last
        self._last = now


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round of a federated LoRA fine-tuning; return the output folder."""
    started = time.monotonic()
    out = _prepare_output(cfg)
    tracker = make_tracker(cfg.tracking, out, json.loads(cfg.to_json()))
    if cfg.dp and cfg.dp_reproducible_noise:
        log(WARNING, "fedlora: %s", NOT_PRIVATE)
    try:
        table = load_table(cfg)
        check_partitions(cfg, table)
        strategy = build_strategy(cfg)
        # configure_train and aggregate_train go through Flower's DP wrapper when asked
        central = CentralDP(strategy, cfg, out) if cfg.central_dp != "off" else None
        driver = central or strategy
        # Flower processes inherit OMP_NUM_THREADS=1 (clients share the cores); the server
        # evaluates while clients are idle, so it may use all of them.
        torch.set_num_threads(int(os.environ.get("FEDLORA_SERVER_THREADS", os.cpu_count() or 1)))
        spec = lora_spec(cfg)
        fresh = build_lora_model(cfg.model, table.num_labels, spec, seed=cfg.seed)
        check_rank_fits(adapted_layers(fresh), cfg.lora_rank)
        modules = {"LoRA modules": ",".join(sorted(fresh.peft_config["default"].target_modules))}
        state = strategy.initial_state(state_from_peft(fresh, spec.scaling))
        eval_frame = eval_subset(table.test, cfg.eval_examples, cfg.seed)
        eval_data = tokenize(
            eval_frame, load_tokenizer(cfg.model, cfg.task), cfg.max_seq_len, cfg.task
        )
        evaluator = ServerEvaluator(cfg, table.num_labels, eval_data)
        base_config = ConfigRecord(
            {protocol.RUN_CONFIG: cfg.to_json(), protocol.LABEL_NAMES: list(table.label_names)}
        )

        samples = SampleWriter(cfg, out, eval_frame)
        done = 0
        if cfg.resume:
            done, state = _resume(out, cfg, strategy)
        else:
            samples.record("before training", evaluator.model_for(state))
            t0 = time.monotonic()
            ev = evaluator(state)
            record = round_record(0, None, ev, {}, cfg.task) | {"seconds": time.monotonic() - t0}
            results.append_record(out, record)
            tracker.log_round(record)
            log(INFO, "Round 0: accuracy %.4f, loss %.4f", ev.accuracy, ev.loss)

        driver.summary()
        arrays = to_arrayrecord(state.to_state_dict(), flower_numpy=strategy.options.flower_numpy)
        failures: list[str] = []
        for server_round in range(done + 1, cfg.num_server_rounds + 1):
            t0 = time.monotonic()
            clock = _PhaseClock()
            driver.discover_nodes(grid, ConfigRecord(dict(base_config)), cfg.round_timeout)
            clock.lap("discover")
            messages = driver.configure_train(
                server_round, arrays, ConfigRecord(dict(base_config)), grid
            )
            clock.lap("configure")
            replies = grid.send_and_receive(list(messages), timeout=cfg.round_timeout)
            clock.lap("train")
            new_arrays, _ = driver.aggregate_train(server_round, replies)
            report = strategy.last_report
            if new_arrays is not None:
                arrays = new_arrays
            state = strategy.global_state(arrays)
            clock.lap("aggregate")
            fed_eval = _federated_evaluation(grid, strategy, server_round, arrays, base_config, cfg)
            clock.lap("federated_eval")
            ev = evaluator(state, strategy.base_delta())
            clock.lap("evaluate")
            record = round_record(server_round, report, ev, fed_eval, cfg.task)
            record["seconds"] = time.monotonic() - t0
            record["phase_seconds"] = clock.laps
            # the record goes first: a crash between the two leaves a record that resume drops
            results.append_record(out, record)
            tracker.log_round(record)
            _checkpoint(
                out,
                cfg,
                server_round,
                evaluator.model_for(state, strategy.base_delta()),
                state,
                strategy,
            )
            if report is not None and report.skipped:
                log(WARNING, "Round %d skipped: %s", server_round, report.skip_reason)
            if report is not None and report.strategy_error:
                failures.append(f"round {server_round}: {report.strategy_error}")
                if len(failures) >= cfg.max_failed_rounds:
                    _write_summary(out, cfg, started, {"stopped": "strategy failed"})
                    raise StrategyFailedError(
                        f"Strategy {cfg.strategy!r} failed in {len(failures)} rounds "
                        f"(max-failed-rounds={cfg.max_failed_rounds}); the global adapter was kept "
                        f"unchanged each time. Failures: {'; '.join(failures)}"
                    )
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

        aggregated = [r for r in results.read_records(out) if r["round"] > 0 and not r["skipped"]]
        if not aggregated:
            reasons = sorted({str(r.get("skip_reason")) for r in results.read_records(out)[1:]})
            why = f"no round aggregated anything ({'; '.join(reasons) or 'no rounds ran'})"
            _write_summary(out, cfg, started, {"status": f"**FAILED: {why}**"})
            raise RunFailedError(f"fedlora: the run failed: {why}")
        samples.record("after training", evaluator.model_for(state, strategy.base_delta()))
        export = export_adapter(out, cfg, evaluator, state, strategy)
        excluded = {
            "excluded nodes": "; ".join(f"{n}: {r}" for n, r in strategy.excluded_nodes.items())
        }
        privacy = {} if central is None else {"central DP": central.describe()}
        _write_summary(
            out,
            cfg,
            started,
            {**modules, **privacy, **export, **(excluded if strategy.excluded_nodes else {})},
        )
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()
    log(INFO, "fedlora: run finished; summary in %s", out / results.SUMMARY_FILE)
    return out


class StrategyFailedError(RuntimeError):
    """The strategy failed in too many rounds; the run stops rather than go on corrupted."""


class RunFailedError(RuntimeError):
    """Every round was skipped: the run produced nothing, and must not say it completed."""


def _write_summary(out: Path, cfg: RunConfig, started: float, extra: Mapping[str, str]) -> None:
    records = results.read_records(out)
    header = {
        "strategy": cfg.strategy,
        "model": cfg.model,
        "dataset": f"{cfg.dataset} ({cfg.partitioner}, alpha={cfg.dirichlet_alpha}, "
        f"{cfg.num_partitions} partitions)",
        "rounds": cfg.num_server_rounds,
        "clients per round": cfg.clients_per_round,
        "LoRA": f"r={cfg.lora_rank}, alpha={cfg.lora_alpha}, targets={cfg.lora_targets}"
        + (f", client ranks {cfg.client_ranks}" if cfg.client_ranks else ""),
        "links (density, values)": f"up {cfg.uplink_density:g} {cfg.uplink_values}, "
        f"down {cfg.downlink_density:g} {cfg.downlink_values}",
        **({"client DP-SGD": client_dp_line(cfg)} if cfg.dp else {}),
        **extra,
        "total wall time (s)": f"{time.monotonic() - started:.1f}",
    }
    results.write_summary(out, records, header)
    results.plot_rounds(out, records, title=f"{cfg.strategy} on {cfg.dataset}")


NOT_PRIVATE = (
    "NOT PRIVATE: dp-reproducible-noise=true draws every client's noise and sampling from "
    "the run's seed, which the server knows; it can regenerate the noise and subtract it"
)


def client_dp_line(cfg: RunConfig) -> str:
    """The summary's line on client DP-SGD: its settings, and whether it is private at all."""
    line = (
        f"target epsilon {cfg.dp_epsilon:g} per client, clip {cfg.dp_clip:g}, "
        f"accountant {cfg.dp_accountant}"
    )
    if cfg.dp_reproducible_noise:
        return f"**{NOT_PRIVATE}** ({line})"
    return f"{line}; noise and sampling from the OS entropy pool on each node"


def _resume(out: Path, cfg: RunConfig, strategy: LoraStrategy) -> tuple[int, AdapterState]:
    """Restore the global adapter and strategy state of a checkpoint; return its round.

    Records of rounds after the checkpoint (a round that ran but was not checkpointed)
    are dropped, so the resumed run repeats no round and loses none.
    """
    folder = (
        latest_checkpoint(out / "checkpoints")
        if cfg.resume == "latest"
        else Path(cfg.resume).expanduser().resolve()
    )
    state, meta = load_checkpoint(folder)
    # keys added since the checkpoint was written take their defaults
    saved = RunConfig().to_mapping() | dict(meta.get("run_config", {}))
    check_resumable(saved, cfg.to_mapping(), folder)
    done = int(meta["round"])
    if done >= cfg.num_server_rounds:
        raise ConfigError(
            f"Invalid value for 'num-server-rounds': {cfg.num_server_rounds}, but checkpoint "
            f"{folder} already holds round {done}; raise it to run more rounds"
        )
    strategy.load_state_dict(meta.get("strategy_state", {}))
    if cfg.dp and not cfg.node_state_dir:
        log(
            WARNING,
            "Resuming a DP run without node-state-dir: a node restarted without a state-dir "
            "of its own starts a new privacy ledger and under-reports its epsilon",
        )
    kept = [r for r in results.read_records(out) if int(r["round"]) <= done]
    results.write_records(out, kept)
    log(INFO, "fedlora: resuming after round %d from %s", done, folder)
    return done, state


def _prepare_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir).expanduser().resolve()
    if (out / results.ROUNDS_FILE).exists() and not cfg.resume:
        raise ConfigError(
            f"Invalid value for 'output-dir': {str(out)!r} already holds a run "
            f"({results.ROUNDS_FILE}); choose another folder, delete it, or continue it "
            "with resume=latest"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(cfg.to_json())
    log(INFO, "fedlora: writing results to %s", out)
    return out


def _federated_evaluation(
    grid: Grid,
    strategy: LoraStrategy,
    server_round: int,
    arrays: ArrayRecord,
    base_config: ConfigRecord,
    cfg: RunConfig,
) -> dict[str, float]:
    messages = list(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(base_config)), grid)
    )
    if not messages:
        return {}
    agg = strategy.aggregate_evaluate(
        server_round, grid.send_and_receive(messages, timeout=cfg.round_timeout)
    )
    return {} if agg is None else {k: float(v) for k, v in agg.items()}


def _checkpoint(
    out: Path,
    cfg: RunConfig,
    server_round: int,
    model: PeftModel,
    state: AdapterState,
    strategy: LoraStrategy,
) -> None:
    """Write this round's checkpoint; keep the newest ``keep-checkpoints`` of them."""
    folder = out / "checkpoints"
    meta = {
        "round": server_round,
        "strategy": cfg.strategy,
        "strategy_state": strategy.state_dict(),
        "run_config": cfg.to_mapping(),
    }
    save_checkpoint(folder / f"round-{server_round:04d}", model, state, meta)
    if cfg.keep_checkpoints > 0:
        for old in sorted(folder.glob("round-*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def export_adapter(
    out: Path,
    cfg: RunConfig,
    evaluator: ServerEvaluator,
    state: AdapterState,
    strategy: LoraStrategy,
) -> dict[str, str]:
    """Save the final adapter in PEFT format (loadable on the original base model).

    When the strategy merged deltas into the base (FLoRA), the total delta per module is
    compressed to one rank-``lora-rank`` adapter by truncated SVD (its error and accuracy
    are reported) and the fully merged model is saved too.
    """
    final = out / "adapter"
    meta = {
        "round": cfg.num_server_rounds,
        "strategy": cfg.strategy,
        "run_config": cfg.to_mapping(),
    }
    base = strategy.base_delta()
    if base is None:
        save_checkpoint(final, evaluator.model_for(state), state, meta)
        return {"adapter": str(final)}
    total = {
        m: merge_product(base.get(m), state.scaling, f.b, f.a) for m, f in state.factors.items()
    }
    factors, num, den = {}, 0.0, 0.0
    for m, delta in total.items():
        b, a, err = truncated_svd(delta, cfg.lora_rank)
        factors[m] = LoraFactors(a=a, b=b)
        sq = float(np.sum(np.asarray(delta, np.float64) ** 2))
        num, den = num + err**2 * sq, den + sq
    spec = lora_spec(cfg)
    svd_state = AdapterState(
        {m: LoraFactors(f.a, (f.b / spec.scaling).astype(np.float32)) for m, f in factors.items()},
        state.dense,
        spec.scaling,
    )
    svd_error = float(np.sqrt(num / den)) if den > 0 else 0.0
    save_checkpoint(
        final, evaluator.model_for(svd_state), svd_state, meta | {"svd_truncation_error": svd_error}
    )
    svd_eval = evaluator(svd_state)
    merged = evaluator.model_for(state, base).merge_and_unload()
    merged.save_pretrained(out / "merged-model")
    load_tokenizer(cfg.model, cfg.task).save_pretrained(out / "merged-model")
    # merge_and_unload changed the cached model in place: drop it
    evaluator.forget(state.rank)
    log(
        INFO,
        "Exported rank-%d SVD adapter: truncation error %.3e, accuracy %.4f",
        cfg.lora_rank,
        svd_error,
        svd_eval.accuracy,
    )
    return {
        "adapter": f"{final} (rank-{cfg.lora_rank} SVD of the merged delta, truncation error "
        f"{svd_error:.3e}, accuracy {svd_eval.accuracy:.4f})",
        "merged model": str(out / "merged-model"),
    }
