"""LoRA adapters as plain data: per-module (A, B) factors plus dense trainable tensors.

Keys are exactly peft's (``...query.lora_A.weight``, ``...classifier.weight``), so a
state written with :func:`save_adapter` loads with ``PeftModel.from_pretrained`` and
nothing else. Everything here is numpy float32: it is what crosses the wire (an
ArrayRecord cannot carry bfloat16) and what the strategies' pure math works on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.protocol import MERGE_PREFIX

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


class AdapterError(ValueError):
    """An adapter state is inconsistent (missing keys, wrong shapes, non-finite values)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight matrix: dW = s * b @ a with a: (r, d_in), b: (d_out, r)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterState:
    """A whole adapter: LoRA factors keyed by module path, dense tensors by peft key.

    ``scaling`` is the s of dW = s B A for every module (alpha / r, or alpha / sqrt(r)).
    """

    factors: Mapping[str, LoraFactors]
    dense: Mapping[str, np.ndarray] = field(default_factory=dict)
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        """The (common) rank of the factors; 0 for an adapter without LoRA modules."""
        ranks = {f.rank for f in self.factors.values()}
        if len(ranks) > 1:
            raise AdapterError(f"Adapter has mixed ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    def to_state_dict(self) -> dict[str, np.ndarray]:
        """Flat peft-keyed mapping (``module.lora_A.weight`` ...)."""
        out: dict[str, np.ndarray] = {}
        for module, f in self.factors.items():
            out[module + A_SUFFIX] = f.a
            out[module + B_SUFFIX] = f.b
        out.update(self.dense)
        return out

    def num_parameters(self) -> int:
        """Number of scalars the adapter holds (what a dense fp32 message would carry)."""
        return sum(int(v.size) for v in self.to_state_dict().values())

    def check_finite(self) -> None:
        """Raise naming the first tensor that holds NaN or Inf."""
        for key, value in self.to_state_dict().items():
            if not np.all(np.isfinite(value)):
                raise AdapterError(f"Tensor '{key}' contains NaN or Inf")


def state_from_dict(tensors: Mapping[str, np.ndarray], scaling: float) -> AdapterState:
    """Split a flat peft-keyed mapping into LoRA factors and dense tensors."""
    factors: dict[str, LoraFactors] = {}
    dense: dict[str, np.ndarray] = {}
    a_keys = {k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)}
    b_keys = {k[: -len(B_SUFFIX)] for k in tensors if k.endswith(B_SUFFIX)}
    if a_keys != b_keys:
        odd = sorted(a_keys ^ b_keys)[0]
        raise AdapterError(f"Module '{odd}' has only one of lora_A / lora_B")
    for module in sorted(a_keys):
        a = np.asarray(tensors[module + A_SUFFIX], dtype=np.float32)
        b = np.asarray(tensors[module + B_SUFFIX], dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"Module '{module}': lora_A {a.shape} and lora_B {b.shape} do not form B @ A"
            )
        factors[module] = LoraFactors(a=a, b=b)
    for key, value in tensors.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)):
            dense[key] = np.asarray(value, dtype=np.float32)
    return AdapterState(factors=factors, dense=dense, scaling=float(scaling))


def state_from_peft(model: PeftModel, scaling: float) -> AdapterState:
    """Read the trainable adapter (LoRA + modules_to_save) out of a peft model."""
    sd = get_peft_model_state_dict(model)
    return state_from_dict(
        {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in sd.items()}, scaling
    )


def load_into_peft(model: PeftModel, state: AdapterState) -> None:
    """Write ``state`` into ``model``; every key and shape must match exactly."""
    current = get_peft_model_state_dict(model)
    incoming = state.to_state_dict()
    missing = sorted(set(current) - set(incoming))
    extra = sorted(set(incoming) - set(current))
    if missing or extra:
        raise AdapterError(
            f"Adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, value in incoming.items():
        if tuple(current[key].shape) != value.shape:
            raise AdapterError(
                f"Tensor '{key}' has shape {value.shape}, the model expects "
                f"{tuple(current[key].shape)}"
            )
    dtype = next(iter(current.values())).dtype
    result = set_peft_model_state_dict(
        model, {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in incoming.items()}
    )
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterError(f"peft did not recognise keys {unexpected[:3]}")


RAW_STYPE = "raw"
"""Array serialisation of fedlora's records: the bare bytes, dtype and shape in the Array.

Flower's default ("numpy.ndarray") stores an ``np.save`` file, whose header costs about
128 bytes per array: more than a sparse tensor's payload at low density.
"""

_WIRE_DTYPES = frozenset(
    np.dtype(t).str for t in ("<f4", "<f2", "<f8", "|i1", "|u1", "<u2", "<u4", "<u8", "<i4", "<i8")
)


def to_arrayrecord(tensors: Mapping[str, np.ndarray], *, flower_numpy: bool = False) -> ArrayRecord:
    """Flat mapping -> Flower ArrayRecord of raw little-endian bytes (never pickle).

    ``flower_numpy`` stores Flower's own ``np.save`` form instead (a header more per
    tensor), the only one Flower's DP wrappers and ``fixedclipping_mod`` can read.
    """
    if flower_numpy:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    out = {}
    for key, value in tensors.items():
        v = np.ascontiguousarray(value)
        v = v.astype(v.dtype.newbyteorder("<"), copy=False)
        out[key] = Array(dtype=v.dtype.str, shape=tuple(v.shape), stype=RAW_STYPE, data=v.tobytes())
    return ArrayRecord(out)


NUMPY_STYPE = "numpy.ndarray"
"""Flower's own Array serialisation: the bytes of an ``np.save`` file."""


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> flat mapping of numpy arrays (raw or Flower's numpy form).

    The record may come from a peer, so nothing in it is trusted: an unknown
    serialisation, a dtype that is not a plain number, a shape with negative dimensions,
    or a byte count that does not match the declared shape raises :class:`AdapterError`
    before anything is allocated (a corrupt reply, not a crash). Flower's own
    ``Array.numpy()`` is not used: it trusts the ``.npy`` header, so an empty array
    raises ``EOFError`` and a header claiming 10^12 entries ``MemoryError``.
    """
    out = {}
    for key, array in record.items():
        if array.stype == RAW_STYPE:
            dtype, shape = _plain_dtype(key, array.dtype), _shape(key, array.shape)
            out[key] = _from_bytes(key, array.data, 0, dtype, shape, fortran=False)
        elif array.stype == NUMPY_STYPE:
            out[key] = _from_npy(key, array.data)
        else:
            raise AdapterError(
                f"array '{key}' has serialisation '{array.stype}'; expected '{RAW_STYPE}' or "
                f"'{NUMPY_STYPE}'"
            )
    return out


def _plain_dtype(key: str, name: object) -> np.dtype:
    try:
        dtype = np.dtype(str(name))
    except TypeError:
        dtype = None
    if dtype is None or dtype.newbyteorder("<").str not in _WIRE_DTYPES:
        raise AdapterError(f"array '{key}' has dtype '{name}', not a plain number type")
    return dtype


def _shape(key: str, shape: object) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise AdapterError(f"array '{key}' has shape {shape!r}, not a tuple of sizes") from None
    if any(d < 0 for d in dims):
        raise AdapterError(f"array '{key}' has shape {dims} with a negative size")
    return dims


def _from_bytes(
    key: str, data: bytes, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool
) -> np.ndarray:
    """A copy of the array ``data[offset:]`` holds, after checking its size matches."""
    size = len(data) - offset
    if size != dtype.itemsize * math.prod(shape):
        raise AdapterError(f"array '{key}': {size} bytes do not hold {dtype} of shape {shape}")
    flat = np.frombuffer(data, dtype=dtype, offset=offset, count=math.prod(shape))
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _from_npy(key: str, data: bytes) -> np.ndarray:
    """An ``np.save`` file read by its header, checked against its length first."""
    from io import BytesIO

    buffer = BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(buffer)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as err:
        raise AdapterError(f"array '{key}' is not a readable .npy array ({err})") from None
    dtype = _plain_dtype(key, dtype)
    return _from_bytes(key, data, buffer.tell(), dtype, _shape(key, shape), bool(fortran))


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes of ``record`` as Flower serialises it for the transport (protobuf)."""
    from flwr.common import serde

    return serde.array_record_to_proto(record).ByteSize()


def resize_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad or truncate to ``rank`` (HetLoRA-style; padding is exact, truncation is not)."""
    r = factors.rank
    if rank == r:
        return factors
    if rank < r:
        return LoraFactors(a=factors.a[:rank].copy(), b=factors.b[:, :rank].copy())
    a = np.zeros((rank, factors.a.shape[1]), dtype=factors.a.dtype)
    b = np.zeros((factors.b.shape[0], rank), dtype=factors.b.dtype)
    a[:r] = factors.a
    b[:, :r] = factors.b
    return LoraFactors(a=a, b=b)


def module_names(states: Iterable[AdapterState]) -> list[str]:
    """The module keys shared by all states, sorted; raise if they disagree."""
    names: list[str] | None = None
    for state in states:
        current = sorted(state.factors)
        if names is None:
            names = current
        elif current != names:
            raise AdapterError("Adapters adapt different modules")
    return names or []


def start_tensors(
    fresh: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    *,
    rank: int,
    reinit: bool,
    a_from_seed: bool,
    init_seed: int,
) -> dict[str, np.ndarray]:
    """The adapter a client starts its round from (the client-side half of a ClientPlan).

    ``fresh`` is the model's own initialisation. Received factors replace it unless
    ``reinit`` (then B = 0 and A stays fresh); lora_A is the shared seeded draw when
    ``a_from_seed``; received dense tensors (the head) always load.
    """
    from fedlora.seeded import seeded_a

    start = {k: np.asarray(v) for k, v in fresh.items()}
    for key, value in received.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)) or not reinit:
            start[key] = np.asarray(value)
    for key, value in start.items():
        if reinit and key.endswith(B_SUFFIX):
            start[key] = np.zeros_like(value)
        if a_from_seed and key.endswith(A_SUFFIX):
            start[key] = seeded_a(key[: -len(A_SUFFIX)], rank, value.shape[1], init_seed)
    return start


def merge_into_base(
    delta: Mapping[str, np.ndarray] | None, stack: AdapterState
) -> dict[str, np.ndarray]:
    """The base delta after merging ``stack`` (s B A per module) into ``delta``.

    Server and clients both merge FLoRA stacks with this function, in round order, so
    their merged bases agree bit for bit.
    """
    from fedlora.delta import merge_product

    out = dict(delta or {})
    for module, f in stack.factors.items():
        out[module] = merge_product(out.get(module), stack.scaling, f.b, f.a)
    return out


def merge_received_stacks(
    base: Mapping[str, np.ndarray],
    last_merged: int,
    received: Mapping[str, np.ndarray],
    rounds: Iterable[int],
    scaling_of_rank: Callable[[int], float],
) -> tuple[dict[str, np.ndarray], int]:
    """Merge the stacks ``received`` under ``merge/<round>/`` keys into ``base``, in order.

    Rounds at or before ``last_merged`` are already in the base and skipped. Returns the
    new base and the last round merged. This is the client half of FLoRA's catch-up.
    """
    out, last = dict(base), last_merged
    for r in rounds:
        if r <= last:
            continue
        prefix = f"{MERGE_PREFIX}{r}/"
        stack = state_from_dict(
            {k[len(prefix) :]: v for k, v in received.items() if k.startswith(prefix)}, 1.0
        )
        if not stack.factors:
            raise AdapterError(f"Stack of round {r} is missing from the payload")
        stack = AdapterState(stack.factors, {}, scaling_of_rank(stack.rank))
        out, last = merge_into_base(out, stack), r
    return out, last
