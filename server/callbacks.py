"""What happens after each round besides the round itself: records, tracking, checkpoints.

Side effects are callbacks (pfl-research's pattern): the round loop computes a round's
record and state and hands them to each callback in order. The record goes first, so a
crash between the two leaves a record that a resumed run drops, never a checkpoint
without its record.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedlora.config import RunConfig
from fedlora.lora.state import AdapterState
from fedlora.run import results
from fedlora.run.checkpoint import save_checkpoint
from fedlora.run.tracking import Tracker
from fedlora.server.evaluation import ServerEvaluator
from fedlora.server.flower_strategy import LoraFlowerStrategy


class RoundCallback(Protocol):
    """Called once a round is evaluated, with its record and the new global adapter."""

    def __call__(self, server_round: int, record: Mapping[str, Any], state: AdapterState) -> None:
        """React to the end of ``server_round``."""


class RecordWriter:
    """Appends the round's record to ``rounds.jsonl`` and logs it to the tracker."""

    def __init__(self, out: Path, tracker: Tracker) -> None:
        self.out, self.tracker = out, tracker

    def __call__(self, server_round: int, record: Mapping[str, Any], state: AdapterState) -> None:
        """Write ``record`` (flushed: a crash loses nothing written)."""
        results.append_record(self.out, record)
        self.tracker.log_round(dict(record))


class Checkpointer:
    """Saves the global adapter (PEFT format) and the server's state after every round.

    Keeps the newest ``keep-checkpoints``; a resumed run continues from the newest.
    """

    def __init__(
        self, out: Path, cfg: RunConfig, evaluator: ServerEvaluator, flower: LoraFlowerStrategy
    ) -> None:
        self.folder, self.cfg, self.evaluator, self.flower = (
            out / "checkpoints",
            cfg,
            evaluator,
            flower,
        )

    def __call__(self, server_round: int, record: Mapping[str, Any], state: AdapterState) -> None:
        """Write ``checkpoints/round-NNNN`` atomically and drop the oldest beyond the limit."""
        base = self.flower.strategy.base_delta()
        meta = {
            "round": server_round,
            "strategy": self.cfg.strategy,
            "server_state": self.flower.state_dict(),
            "run_config": self.cfg.to_mapping(),
        }
        model = self.evaluator.model_for(state, base)
        save_checkpoint(self.folder / f"round-{server_round:04d}", model, state, meta)
        if self.cfg.keep_checkpoints > 0:
            for old in sorted(self.folder.glob("round-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
