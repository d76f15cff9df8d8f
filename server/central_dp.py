"""Central (user-level) DP: Flower's own fixed-clipping wrappers around a LoRA strategy.

Flower 1.39's ``DifferentialPrivacyClientSideFixedClipping`` (nodes clip their update
with ``fixedclipping_mod``) and ``DifferentialPrivacyServerSideFixedClipping`` (the
server clips) add N(0, (z C / m)^2) to every tensor the wrapped strategy returns. That is
the Gaussian mechanism only when the strategy returns the plain mean of what the m nodes
sent, which is what ``LoraStrategy.central_dp`` declares (FedAvg: both modes; FFA-LoRA:
client clipping, since its replies carry no A; FLoRA and LoRA-FAIR: neither).

What this module adds around the wrapper, and why:

- :meth:`~fedlora.server.flower_strategy.LoraFlowerStrategy.screen_replies` runs first, so
  a failed node or a misshapen reply is recorded and left out instead of making the
  wrapper skip the round or fail deep in numpy;
- nodes that declare a rank other than ``lora-rank`` are excluded when they describe
  themselves, instead of being sampled and set aside round after round;
- an accountant: Flower's own requires its ``FedAvg`` class, so the epsilon of the rounds
  released so far comes from Opacus (:func:`fedlora.privacy.accounting.central_epsilon`). The count
  of releases is written to ``central_dp.json`` the moment a round is released, so a
  crash between a release and its checkpoint cannot make a resumed run forget it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedlora.config import ConfigError, RunConfig
from fedlora.config.run_config import check_central_dp_round
from fedlora.privacy.accounting import central_epsilon
from fedlora.server.flower_strategy import LoraFlowerStrategy
from fedlora.server.reports import round_metrics
from fedlora.strategies.api import logger

WRAPPERS = {
    "client": DifferentialPrivacyClientSideFixedClipping,
    "server": DifferentialPrivacyServerSideFixedClipping,
}
EPSILON_KEY = "central-epsilon"
LEDGER_FILE = "central_dp.json"


class CentralDP(Strategy):
    """A Flower strategy: Flower's DP wrapper around ``inner``, screened and accounted."""

    def __init__(self, inner: LoraFlowerStrategy, cfg: RunConfig, out: Path) -> None:
        mode, strategy, o = cfg.central_dp, inner.strategy, inner.options
        if mode not in strategy.central_dp:
            composes = sorted(strategy.central_dp) or ["none"]
            raise ConfigError(
                f"Invalid value for 'central-dp': {mode!r}: strategy '{strategy.name}' composes "
                f"with {', '.join(composes)} (Flower's wrappers add noise for a plain mean of the "
                "replies; see docs/privacy.md)"
            )
        check_central_dp_round(mode, o.weights.weighting, o.min_replies, o.clients_per_round)
        # a node's B is rescaled and padded to the global rank, which changes its influence
        inner.nodes.required_rank = strategy.lora.rank
        self.inner = inner
        self.mode = mode
        self.ledger = out / LEDGER_FILE
        self.noise_multiplier = cfg.central_dp_noise
        self.clipping_norm = cfg.central_dp_clip
        self.delta = cfg.central_dp_delta
        self.releases = 0  # rounds whose noised mean was released
        if cfg.resume and self.ledger.is_file():
            try:
                self.releases = int(json.loads(self.ledger.read_text())["releases"])
            except (ValueError, KeyError, TypeError) as err:  # never resume with a lost count
                raise ConfigError(
                    f"Cannot resume: the central-DP ledger {self.ledger} is unreadable ({err!r}); "
                    "the rounds it counted would go unaccounted"
                ) from None
        self.wrapper = WRAPPERS[mode](
            inner,
            noise_multiplier=cfg.central_dp_noise,
            clipping_norm=cfg.central_dp_clip,
            num_sampled_clients=o.clients_per_round,
        )

    def epsilon(self) -> float:
        """Epsilon spent so far, at ``central-dp-delta``."""
        return central_epsilon(self.noise_multiplier, self.releases, self.delta)

    def describe(self) -> str:
        """One line for the run summary."""
        return (
            f"{self.mode}-side clipping (Flower's {type(self.wrapper).__name__}), C="
            f"{self.clipping_norm}, z={self.noise_multiplier}, noise std z C / m = "
            f"{self.noise_multiplier * self.clipping_norm / self.wrapper.num_sampled_clients:.4g}; "
            f"epsilon {self.epsilon():.4g} at delta {self.delta:g} after {self.releases} rounds"
        )

    def summary(self) -> None:
        """Flower's wrapper summary (which includes the strategy's)."""
        self.wrapper.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapper's configure_train (it adds the clipping norm, or keeps the arrays)."""
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip (server mode), aggregate, add noise, and account the release."""
        kept = self.inner.screen_replies(server_round, replies, whole=self.mode == "server")
        arrays, metrics = self.wrapper.aggregate_train(server_round, kept)
        if arrays is not None:
            self.releases += 1
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ledger.with_suffix(".tmp")
            tmp.write_text(json.dumps({"releases": self.releases, "mode": self.mode}))
            os.replace(tmp, self.ledger)  # before anyone sees the release
        # the wrapper returns no metrics when it skips the round: the report still has them
        report = self.inner.reports[server_round]
        report.metrics[EPSILON_KEY] = self.epsilon()
        metrics = MetricRecord(round_metrics(report))
        logger.log(
            INFO,
            "Central DP: %d releases, epsilon %.4g at delta %g",
            self.releases,
            self.epsilon(),
            self.delta,
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation as without DP (its metrics are not noised; privacy.md)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation as without DP."""
        return self.inner.aggregate_evaluate(server_round, replies)
