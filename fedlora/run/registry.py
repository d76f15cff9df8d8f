"""Strategy registry: built-ins by name, plugins by entry point or ``package.module:Class``.

This is the only module of ``fedlora`` that reaches into ``strategies``, and only by
import path, so the library keeps no compile-time dependency on the strategies.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fedlora.config import ConfigError

ENTRY_POINT_GROUP = "fedlora.strategies"

BUILTINS: dict[str, str] = {
    "fedavg": "fedlora.strategies.fedavg:FedAvg",
    "ffa_lora": "fedlora.strategies.ffa_lora:FfaLora",
    "flora": "fedlora.strategies.flora:Flora",
    "lora_fair": "fedlora.strategies.lora_fair:LoraFair",
    "flexlora": "fedlora.strategies.flexlora:FlexLora",
    "fedsvd": "fedlora.strategies.fedsvd:FedSvd",
    "rolora": "fedlora.strategies.rolora:RoLora",
    "fedrot_lora": "fedlora.strategies.fedrot_lora:FedRotLora",
    "fedex_lora": "fedlora.strategies.fedex_lora:FedExLora",
    "fed_sb": "fedlora.strategies.fed_sb:FedSb",
    "fed_sb_data": "fedlora.strategies.fed_sb:FedSbData",
    "fedsa_lora": "fedlora.strategies.fedsa_lora:FedSaLora",
}


@dataclass(frozen=True)
class StrategyEntry:
    """A strategy the registry knows, not yet imported."""

    name: str
    target: str  # "package.module:Class"
    source: str  # "built-in" or the distribution that registered it


def available() -> dict[str, StrategyEntry]:
    """Every known strategy by name: built-ins first, then entry points."""
    found = {name: StrategyEntry(name, target, "built-in") for name, target in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:  # a plugin cannot shadow a built-in, or an earlier plugin
            first = found[ep.name]
            if first.target != ep.value:
                warnings.warn(
                    f"Strategy plugin {ep.value!r} registers the name {ep.name!r}, which "
                    f"{first.target!r} ({first.source}) already has: that one is used; "
                    "register the plugin under another name",
                    stacklevel=2,
                )
            continue
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        found[ep.name] = StrategyEntry(ep.name, ep.value, dist)
    return found


def load_strategy_class(name: str) -> type[Any]:
    """Import the strategy class for ``name`` (a registered name or ``pkg.module:Class``)."""
    known = available()
    if name in known:
        entry = known[name]
    elif ":" in name:
        entry = StrategyEntry(name, name, "import path")
    else:
        raise ConfigError(
            f"Invalid value for 'strategy': {name!r} is not a known strategy. "
            f"Known: {', '.join(sorted(known))} (or give 'package.module:Class')"
        )
    module_name, _, attr = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == "strategies" or (err.name or "").startswith("strategies."):
            raise ConfigError(
                f"Strategy {name!r} ({entry.source}) imports '{err.name}', fedlora 0.1's "
                "strategy API. Since 0.2 it is 'fedlora.strategies.api': change "
                "'from strategies.base import ...' to 'from fedlora.strategies.api import ...', "
                "and the constructor's 'options' to (lora, seed=..., settings=...); see "
                "docs/plugins.md"
            ) from err
        raise ConfigError(
            f"Strategy {name!r} ({entry.source}) cannot be imported from {module_name!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    except Exception as err:
        raise ConfigError(
            f"Strategy {name!r} ({entry.source}) cannot be imported from {module_name!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"Strategy {name!r}: module {module_name!r} has no attribute {attr!r}")
    return cls


def check_run_strategy(cfg: Any) -> type[Any]:
    """:func:`check_strategy_config` for a run configuration (its strategy's class)."""
    cls = check_strategy_config(
        cfg.strategy,
        cfg.strategy_extra,
        cfg.client_rank_list,
        cfg.lora_rank,
        cfg.base_quantization,
        cfg.server_optimizer,
    )
    check_secure_aggregation(cfg.secure_aggregation, cls, cfg.strategy)
    check_personal_evaluation(cfg.fraction_evaluate, cls, cfg.strategy)
    check_calibration(cfg.dp, cls, cfg.strategy)
    return cls


def check_calibration(dp: bool, cls: type[Any], name: str) -> None:
    """Refuse DP for a strategy that ``calibrates`` (asks for base-weight gradients).

    A quantised base calibrates as a float one does (the gradients are taken from the
    layers' inputs and output gradients, not from the packed weights).
    """
    if getattr(cls, "calibrates", False) and dp:
        raise ConfigError(
            f"Invalid value for 'dp': True, but strategy {name!r} calibrates: its first round "
            "replies with each node's mean gradient of the base weights, which DP-SGD "
            "neither clips nor noises; use fed_sb (seeded bases) or dp=false"
        )


def check_personal_evaluation(fraction_evaluate: float, cls: type[Any], name: str) -> None:
    """Refuse a strategy with personal factors and no federated evaluation.

    Its global adapter is no model on its own (each node keeps its own lora_B), so the
    server does not evaluate it: the nodes' evaluation is the run's only accuracy.
    """
    if cls.personal_factors and fraction_evaluate <= 0.0:
        raise ConfigError(
            f"Invalid value for 'fraction-evaluate': {fraction_evaluate!r}, but strategy "
            f"{name!r} keeps a personal factor on each node (declares personal_factors): the "
            "global adapter is no model on its own, so the server cannot evaluate it and the "
            "run's accuracy comes from federated evaluation; set fraction-evaluate > 0 "
            "(1.0 evaluates every node)"
        )


def check_secure_aggregation(mode: str, cls: type[Any], name: str) -> None:
    """Refuse SecAgg+ for a strategy that needs more than the weighted sum of the replies."""
    if mode != "off" and not cls.secure_sum:
        raise ConfigError(
            f"Invalid value for 'secure-aggregation': {mode!r}, but strategy {name!r} does not "
            "declare secure_sum: its aggregate needs each node's update (a product, a stack "
            "or an SVD of the products), and SecAgg+ gives the server only their weighted "
            "sum; use fedavg, ffa_lora, rolora, fedsvd, fedrot_lora, fed_sb or fedsa_lora, or "
            "secure-aggregation=off"
        )


def check_strategy_config(
    name: str,
    options: Mapping[str, Any],
    client_ranks: Sequence[int],
    lora_rank: int,
    base_quantization: str = "none",
    server_optimizer: str = "none",
) -> type[Any]:
    """Load strategy ``name`` and check its settings and rank support, before any process.

    The same checks the server makes when it builds the strategy, so a typo in
    ``strategy-options`` or a mix of ranks the strategy cannot aggregate fails in the CLI.
    """
    from fedlora.config.settings import parse_settings
    from fedlora.strategies.api import LoraStrategy

    cls = load_strategy_class(name)
    if not (isinstance(cls, type) and issubclass(cls, LoraStrategy)):
        raise ConfigError(
            f"Invalid value for 'strategy': {name!r} resolves to {cls!r}, which is not "
            "a subclass of fedlora.strategies.api.LoraStrategy"
        )
    if any(r != lora_rank for r in client_ranks) and not cls.heterogeneous_ranks:
        raise ConfigError(
            f"Invalid value for 'client-ranks': {','.join(map(str, client_ranks))!r}, but "
            f"strategy {name!r} does not support heterogeneous ranks"
        )
    if cls.merges_into_base and base_quantization != "none":
        raise ConfigError(
            f"Invalid value for 'base-quantization': {base_quantization!r}, but strategy "
            f"{name!r} merges every round's stack into the nodes' base weights, and a "
            "quantised base has no weights that can take W0 + delta; use "
            "base-quantization=none (bf16 precision is fine: the merged deltas stay float32)"
        )
    if server_optimizer != "none" and not cls.server_optimizer:
        raise ConfigError(
            f"Invalid value for 'server-optimizer': {server_optimizer!r}, but strategy {name!r} "
            "does not declare server_optimizer: its aggregate is not a point in the global "
            "adapter's coordinates (it re-initialises or re-factorises the adapter), so "
            "aggregate - current is no pseudo-gradient; use server-optimizer=none"
        )
    mixed = any(r != lora_rank for r in client_ranks)
    if server_optimizer != "none" and mixed and not cls.exact:
        raise ConfigError(
            f"Invalid value for 'server-optimizer': {server_optimizer!r} with mixed "
            f"client-ranks, but strategy {name!r} is not exact: nodes of lower rank receive a "
            "truncated adapter, so the aggregate moves even when no node trains and "
            "aggregate - current is no pseudo-gradient; use one rank or an exact strategy"
        )
    parse_settings(cls.Settings, options, cls.name or name)
    return cls
