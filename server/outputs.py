"""A run's output folder: preparing it, resuming from its checkpoints, its summary.

Every file a run writes goes under ``output-dir``: ``run_config.json`` first, then one
line of ``rounds.jsonl`` and one checkpoint per round (:mod:`fedlora.server.callbacks`),
and ``summary.md`` with the plot at the end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.state import AdapterState
from fedlora.run import results
from fedlora.run.checkpoint import check_resumable, latest_checkpoint, load_checkpoint
from fedlora.strategies.api import logger

NOT_PRIVATE = (
    "NOT PRIVATE: dp-reproducible-noise=true draws every client's noise and sampling from "
    "the run's seed, which the server knows; it can regenerate the noise and subtract it"
)


def prepare_output(cfg: RunConfig) -> Path:
    """The output folder, created, with the run's configuration written into it."""
    out = Path(cfg.output_dir).expanduser().resolve()
    if (out / results.ROUNDS_FILE).exists() and not cfg.resume:
        raise ConfigError(
            f"Invalid value for 'output-dir': {str(out)!r} already holds a run "
            f"({results.ROUNDS_FILE}); choose another folder, delete it, or continue it "
            "with resume=latest"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(cfg.to_json())
    logger.log(INFO, "fedlora: writing results to %s", out)
    return out


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint holds: its round, the global adapter and the server's state."""

    round: int
    state: AdapterState
    server_state: dict[str, Any]


def resume(out: Path, cfg: RunConfig) -> Resumed:
    """The checkpoint ``resume`` names, checked against this run's configuration.

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
    if cfg.dp and not cfg.node_state_dir:
        logger.log(
            WARNING,
            "Resuming a DP run without node-state-dir: a node restarted without a state-dir "
            "of its own starts a new privacy ledger and under-reports its epsilon",
        )
    kept = [r for r in results.read_records(out) if int(r["round"]) <= done]
    results.write_records(out, kept)
    logger.log(INFO, "fedlora: resuming after round %d from %s", done, folder)
    return Resumed(done, state, server_state(meta))


def server_state(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The server's state in a checkpoint's metadata.

    Checkpoints of fedlora 0.1 kept it all under ``strategy_state`` (sampling RNG, nodes
    and links beside the strategy's own state); they are read into the current layout.
    """
    if "server_state" in meta:
        return dict(meta["server_state"])
    old = dict(meta.get("strategy_state", {}))
    return {"rng": old.get("rng"), "nodes": old, "links": old.get("links", {}), "strategy": old}


def client_dp_line(cfg: RunConfig) -> str:
    """The summary's line on client DP-SGD: its settings, and whether it is private at all."""
    line = (
        f"target epsilon {cfg.dp_epsilon:g} per client, clip {cfg.dp_clip:g}, "
        f"accountant {cfg.dp_accountant}"
    )
    if cfg.dp_reproducible_noise:
        return f"**{NOT_PRIVATE}** ({line})"
    return f"{line}; noise and sampling from the OS entropy pool on each node"


def write_summary(out: Path, cfg: RunConfig, started: float, extra: Mapping[str, str]) -> None:
    """``summary.md`` and the plot, from the run's records and settings."""
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
        **(
            {"evaluated on": f"{cfg.eval_split} split"}
            | {"held out for validation": f"{cfg.validation_fraction:g} of the training rows"}
            if cfg.validation_fraction
            else {}
        ),
        **extra,
        "total wall time (s)": f"{time.monotonic() - started:.1f}",
    }
    results.write_summary(out, records, header)
    results.plot_rounds(out, records, title=f"{cfg.strategy} on {cfg.dataset}")
