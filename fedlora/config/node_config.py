"""What a node knows about itself (Flower's ``node_config``, ``--node-config`` in deployment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config.run_config import DEVICE_PATTERN
from fedlora.config.values import ConfigError, coerce_value, fail, unknown_key


@dataclass(frozen=True)
class NodeConfig:
    """What a node knows about itself: its partition, or its own data file."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    state_dir: str | None = None
    lora_rank: int | None = None
    device: str | None = None  # this node's own device, over the run's (sites differ)
    # the node's owner refuses a run whose DP noise the server could replay
    refuse_reproducible_noise: bool = False
    # the node's owner sends its update only masked (SecAgg+), never in the clear
    require_secure_aggregation: bool = False

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> NodeConfig:
        """Parse Flower's ``node_config`` (``--node-config`` in deployment)."""
        raw = dict(mapping or {})
        allowed = {
            "partition-id",
            "num-partitions",
            "data-path",
            "state-dir",
            "lora-rank",
            "device",
            "refuse-reproducible-noise",
            "require-secure-aggregation",
        }
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(unknown_key("node-config", unknown[0], raw[unknown[0]], allowed))
        pid = raw.get("partition-id")
        num = raw.get("num-partitions")
        pid = None if pid is None else coerce_value("partition-id", pid, "int")
        num = None if num is None else coerce_value("num-partitions", num, "int")
        if num is not None and num <= 0:
            fail("num-partitions", num, "must be > 0")
        if pid is not None and (pid < 0 or (num is not None and pid >= num)):
            fail("partition-id", pid, f"must be in [0, num-partitions={num})")
        data_path = raw.get("data-path") or None
        if data_path is not None and not Path(str(data_path)).exists():
            fail("data-path", data_path, "file (or dataset folder) does not exist")
        if data_path is None and pid is None:
            raise ConfigError(
                "node-config needs either 'partition-id' (with 'num-partitions') or "
                f"'data-path'; got {raw or '{}'}"
            )
        state_dir = raw.get("state-dir") or None
        rank = raw.get("lora-rank")
        rank = None if rank is None else coerce_value("lora-rank", rank, "int")
        if rank is not None and rank <= 0:
            fail("lora-rank", rank, "must be > 0")
        device = raw.get("device") or None
        if device is not None and not DEVICE_PATTERN.fullmatch(str(device)):
            fail("device", device, "must be auto, cpu, cuda, cuda:N or mps")
        refuse = coerce_value(
            "refuse-reproducible-noise", raw.get("refuse-reproducible-noise", False), "bool"
        )
        secure = coerce_value(
            "require-secure-aggregation", raw.get("require-secure-aggregation", False), "bool"
        )
        return cls(
            refuse_reproducible_noise=refuse,
            require_secure_aggregation=secure,
            device=None if device is None else str(device),
            lora_rank=rank,
            partition_id=pid,
            num_partitions=num,
            data_path=None if data_path is None else str(data_path),
            state_dir=None if state_dir is None else str(state_dir),
        )
