"""One round's aggregation: the weights, the strategy's ``aggregate``, and what it returns.

The strategy is trusted with nothing: the weights come from claims bounded against liars
(:mod:`fedlora.server.weights`), a round with too few valid replies is skipped, and an
``aggregate`` that raises or returns NaN or the wrong shapes keeps the previous global
adapter, with the strategy's name and the reason in the round's report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np

from fedlora.lora.plan import ClientPlan
from fedlora.lora.state import AdapterState
from fedlora.server.replies import check_against
from fedlora.server.reports import RoundReport, client_metrics
from fedlora.server.weights import Claim, client_weights
from fedlora.strategies.api import ClientUpdate, LoraStrategy, aggregation_error, logger

if TYPE_CHECKING:
    from fedlora.server.flower_strategy import RoundOptions


def aggregate_round(
    strategy: LoraStrategy,
    server_round: int,
    updates: Sequence[ClientUpdate],
    current: AdapterState,
    report: RoundReport,
    options: RoundOptions,
    declared: Mapping[int, int],
) -> AdapterState | None:
    """The next global adapter from the round's valid updates, or None (skipped, reported).

    ``declared``: the training examples each node declared when it joined, the bound on
    what it may claim.
    """
    claims = [Claim(u.node_id, u.num_examples, declared.get(u.node_id)) for u in updates]
    weights, anomalies = client_weights(claims, options.weights)
    for a in anomalies:
        logger.log(
            WARNING, "Round %d: node %s's weight cut: %s; counted as %g", server_round,
            a.node_id, a.reason, a.used,
        )  # fmt: skip
    report.anomalies.extend(anomalies)
    if len(updates) < options.min_replies or weights is None:
        report.skip(
            f"{len(updates)} valid replies, fewer than min-replies={options.min_replies}"
            if weights is not None or not updates
            else "all valid replies carry zero examples"
        )
        logger.log(WARNING, "Round %d skipped: %s; global adapter unchanged", server_round,
                   report.skip_reason)  # fmt: skip
        return None
    result = _run_strategy(strategy, server_round, updates, weights, current, report)
    if result is None:
        return None
    by_node = {u.node_id: float(w) for u, w in zip(updates, weights, strict=True)}
    report.outcomes = [
        replace(o, weight=by_node[o.node_id]) if o.status == "ok" else o for o in report.outcomes
    ]
    # no single global product to compare: personal factors (FedSA-LoRA's own B per node),
    # or a calibration round (the nodes trained nothing)
    unmeasured = (
        "personal factors"
        if strategy.personal_factors
        else "calibration"
        if all(u.plan.calibrate for u in updates)
        else ""
    )
    report.aggregation_error = (
        float("nan") if unmeasured else aggregation_error(updates, weights, result)
    )
    report.metrics.update(client_metrics(updates, weights))
    report.metrics.update(strategy.extra_round_metrics(updates, weights, current, result))
    error = f"- ({unmeasured})" if unmeasured else f"{report.aggregation_error:.3e}"
    logger.log(INFO, "Round %d aggregated %d replies, aggregation error %s", server_round,
               len(updates), error)  # fmt: skip
    return result


def _run_strategy(
    strategy: LoraStrategy,
    server_round: int,
    updates: Sequence[ClientUpdate],
    weights: np.ndarray,
    current: AdapterState,
    report: RoundReport,
) -> AdapterState | None:
    """``strategy.aggregate``, checked; None (the round skipped, with the reason) if it fails."""
    try:
        result = strategy.aggregate(server_round, updates, weights, current)
        check_against(result, current, None)
        result.check_finite()
    except Exception as err:  # a plugin's bug must not corrupt the global adapter
        kind = type(strategy)
        name = f"'{strategy.name or '?'}' ({kind.__module__}.{kind.__qualname__})"
        error = f"{type(err).__name__}: {err}"
        report.skip(f"strategy {name} failed: {error}", strategy_error=error)
        logger.log(WARNING, "Round %d: %s; global adapter unchanged", server_round,
                   report.skip_reason)  # fmt: skip
        return None
    return result


def aggregate_secure_sum(
    strategy: LoraStrategy,
    server_round: int,
    mean: Mapping[str, np.ndarray],
    plan: ClientPlan,
    num_examples: int,
    current: AdapterState,
    report: RoundReport,
) -> AdapterState | None:
    """The next global adapter from SecAgg+'s weighted mean of the replies (one update).

    Sound for strategies that declare ``secure_sum`` (the kit checks it): their aggregate
    of the replies equals their aggregate of this one update with weight 1. The
    aggregation error needs each node's product, which the server never sees: not measured.
    """
    try:
        state = strategy.decode_update(server_round, plan, mean, current)
        check_against(state, plan.update_layout(current), plan.rank)
        state.check_finite()
    except Exception as err:
        report.skip(f"the secure sum does not decode: {type(err).__name__}: {err}")
        logger.log(WARNING, "Round %d skipped: %s", server_round, report.skip_reason)
        return None
    update = ClientUpdate(-1, num_examples, state, {}, plan)
    return _run_strategy(strategy, server_round, [update], np.ones(1), current, report)
