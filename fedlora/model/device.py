"""Where a model runs and in what precision: ``device`` and ``precision``, resolved once.

``device``: ``auto`` (CUDA if available, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``
or ``mps``; a device that is not there is a :class:`~fedlora.config.ConfigError` naming it.
``precision``: ``auto`` (bf16 on a CUDA device that supports it, else fp32: on a CPU,
bf16 autocast is slower than fp32 without AMX units, so it is never chosen for you),
``fp32``, ``bf16`` or ``fp16``. Mixed precision is autocast: the LoRA factors and the head
keep float32 master weights, and what goes on the wire is float32 as before. fp16 needs
a gradient scaler (:meth:`Placement.scaler`), bf16 does not.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedlora.config import ConfigError
from fedlora.config.run_config import DEVICE_PATTERN, PRECISIONS

CPU = torch.device("cpu")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The torch device ``name`` means on this machine; an absent one is a ConfigError."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(
            f"Invalid value for '{key}': {name!r} must be auto, cpu, cuda, cuda:N or mps"
        )
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only torch)"
            raise ConfigError(
                f"Invalid value for '{key}': {name!r}, but this machine has {found}; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Invalid value for '{key}': 'mps', but MPS is not available here")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``precision`` on ``device`` (float32 means no autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"Invalid value for 'precision': {precision!r} must be one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"Invalid value for 'precision': 'bf16', but {torch.cuda.get_device_name(device)} "
            "does not support bfloat16; use fp16 or fp32"
        )
    return _DTYPES[precision]


@dataclass(frozen=True)
class Placement:
    """A device and the dtype autocast computes in there (float32: no autocast)."""

    device: torch.device = CPU
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, device: str, precision: str) -> Placement:
        """The placement the ``device`` and ``precision`` settings mean on this machine."""
        where = resolve_device(device)
        return cls(where, resolve_dtype(precision, where))

    @property
    def mixed(self) -> bool:
        """Whether forward passes run under autocast."""
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`dtype` on :attr:`device`, or nothing for float32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (whose small exponent range underflows gradients)."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    def to(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A batch of tensors on this device."""
        if self.device.type == "cpu":
            return batch
        return tuple(t.to(self.device, non_blocking=True) for t in batch)


def release(device: torch.device) -> None:
    """Give back the memory a finished job held on ``device``.

    A long-lived process must not grow over rounds: a Ray actor in simulation serves
    every round.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def start_memory_watch(device: torch.device) -> float | None:
    """MiB allocated on a CUDA ``device`` now (what earlier rounds left), peak reset."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def memory_metrics(device: torch.device, start: float | None) -> dict[str, float]:
    """A CUDA job's device memory, as reply metrics: at its start and at its peak (MiB).

    The start of round t shows what round t - 1 left behind: flat over rounds means a
    long-lived client does not grow.
    """
    if start is None or device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"device-mib-start": start, "device-mib-peak": peak}


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Run the block with ``device`` current (CUDA's per-thread current device)."""
    if device.type == "cuda" and device.index is not None:
        with torch.cuda.device(device):
            yield
    else:
        yield
