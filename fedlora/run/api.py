"""The Python API: run a simulated federation from a script or a notebook, read its results.

    from fedlora.run.api import simulate, load_results

    out = simulate({"num-server-rounds": 3, "lora-rank": 16}, supernodes=4)
    run = load_results(out)
    run.records[-1]["eval_accuracy"], run.summary

The same checks, processes and outputs as ``fedlora simulate`` (a private SuperLink, the
Flower app, every process stopped at the end); a bad value raises
:class:`fedlora.config.ConfigError` before anything starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.run import results


@dataclass(frozen=True)
class RunResults:
    """A finished run's folder, its per-round records and its summary."""

    output_dir: Path
    records: list[dict[str, Any]]
    summary: str

    @property
    def final_accuracy(self) -> float | None:
        """The last evaluated accuracy (None for a causal-LM run without one)."""
        scored = [r["eval_accuracy"] for r in self.records if r.get("eval_accuracy") is not None]
        return scored[-1] if scored else None


def simulate(
    config: Mapping[str, Any] | None = None,
    *,
    supernodes: int | None = None,
    scenario: str | None = None,
    output_dir: str | Path | None = None,
    cpus: int = 2,
    gpus_per_client: float = 0.0,
) -> Path:
    """Run a simulated federation (run-config keys in kebab-case); returns the output folder."""
    from fedlora.run.cli import simulate_from_args

    args = argparse.Namespace(
        scenario=scenario,
        config=[f"{k}={_text(v)}" for k, v in (config or {}).items()],
        output_dir=None if output_dir is None else str(output_dir),
        supernodes=supernodes,
        cpus=cpus,
        gpus_per_client=gpus_per_client,
    )
    return simulate_from_args(args)


def load_results(output_dir: str | Path) -> RunResults:
    """A run's records (rounds.jsonl) and summary (summary.md)."""
    out = Path(output_dir)
    summary = out / results.SUMMARY_FILE
    return RunResults(
        out, results.read_records(out), summary.read_text() if summary.is_file() else ""
    )


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
