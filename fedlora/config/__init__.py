"""The run and node configuration: typed, validated, and the one place defaults live."""

from fedlora.config.node_config import NodeConfig
from fedlora.config.run_config import (
    BUILTIN_DATASETS,
    CENTRAL_DP_MODES,
    EMBEDDED_MODEL,
    INSTRUCTION_ONLY_DATASETS,
    PARTITIONERS,
    TRACKERS,
    RunConfig,
)
from fedlora.config.values import WEIGHTINGS, ConfigError, coerce_value, unknown_key
from fedlora.lora.spec import AUTO_TARGETS, CAUSAL_LM, CLASSIFY, TASKS

__all__ = [
    "AUTO_TARGETS",
    "BUILTIN_DATASETS",
    "CAUSAL_LM",
    "CENTRAL_DP_MODES",
    "CLASSIFY",
    "EMBEDDED_MODEL",
    "INSTRUCTION_ONLY_DATASETS",
    "PARTITIONERS",
    "TASKS",
    "TRACKERS",
    "WEIGHTINGS",
    "ConfigError",
    "NodeConfig",
    "RunConfig",
    "coerce_value",
    "markdown_reference",
    "unknown_key",
]


def markdown_reference() -> str:
    """The run-config reference table (``docs/configuration.md``)."""
    from fedlora.config.reference import markdown_reference as build

    return build()
