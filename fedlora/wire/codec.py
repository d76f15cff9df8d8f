"""Sparse, quantised tensor updates: the codec, its validation and error feedback.

An update u is sent as the top-k entries of u by magnitude (k = ceil(density x numel)),
with values in float32, float16, int8 (one float32 scale per tensor) or one sign bit
each (scaled sign: value = +-scale, scale = mean |value|), and indices in the smallest
unsigned integer type that holds ``numel - 1``. Everything is a numpy array under a
short key, so an encoded update is an ordinary ArrayRecord (no pickle). With the
encoded tensors' names sorted, tensor i has

    "#<i>i"   uint8..uint64   flat indices, strictly increasing (absent: all entries)
    "#<i>v"   f32 / f16 / i8  the kept values (int8: value = q x scale)
              u8              sign: the kept values' signs, 8 to a byte (1 = positive)
    "#<i>s"   float32 (1,)    int8 and sign only
    "#names"  uint32 (1,)     CRC32 of the sorted names, once per update

The dtype of the values field says how to read it, so the receiver needs no codec.
Scaled sign (signSGD with error feedback, Karimireddy et al. 2019) suits the updates
of Adam-trained adapters: Adam moves nearly every coordinate by about the learning
rate, so one bit per entry keeps far more of the update than top-k at the same bytes.

The names and dense shapes are not sent: the receiver knows what it expects. Tensors
sent dense keep their own names. The decoder trusts nothing: every field is checked
against the shape the receiver expects, so a corrupt encoding raises
:class:`CompressionError` with a reason, never an IndexError deep in numpy.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

VALUE_TYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "sign": np.dtype(np.uint8),
}
"""Value encodings by their run-config name, and the dtype their values field has."""

INDEX, VALUE, SCALE = "i", "v", "s"
FIELDS = (INDEX, VALUE, SCALE)
NAMES = "#names"
_INDEX_TYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


class CompressionError(ValueError):
    """An encoded update that cannot be decoded (the reason names the tensor and field)."""


@dataclass(frozen=True)
class Codec:
    """How one direction of the link encodes tensors.

    ``density``: fraction of entries kept per tensor, in (0, 1]. ``values``: one of
    :data:`VALUE_TYPES`. Density 1 with fp32 is the identity: tensors go dense, as
    without compression, so such a run equals an uncompressed one exactly.
    """

    density: float = 1.0
    values: str = "fp32"

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density {self.density} is outside (0, 1]")
        if self.values not in VALUE_TYPES:
            raise ValueError(f"value type '{self.values}' is not one of {sorted(VALUE_TYPES)}")

    @property
    def identity(self) -> bool:
        """Whether this codec leaves tensors as they are."""
        return self.density >= 1.0 and self.values == "fp32"


def index_dtype(numel: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index below ``numel``."""
    for dtype in _INDEX_TYPES:
        if numel - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{numel} entries do not fit a uint64 index")


def kept(numel: int, density: float) -> int:
    """k: entries kept of a tensor of ``numel`` entries (at least one of a non-empty one)."""
    return 0 if numel == 0 else min(numel, max(1, math.ceil(density * numel)))


def encode_tensor(x: np.ndarray, codec: Codec) -> dict[str, np.ndarray]:
    """The encoded fields of one tensor (field letters as keys).

    No index field when every entry is kept: the values are then the dense tensor.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    k = kept(flat.size, codec.density)
    fields: dict[str, np.ndarray] = {}
    if k == flat.size:
        values = flat
    else:  # top-k by magnitude, then in index order (cheap to check, deterministic)
        index = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k])
        fields[INDEX] = index.astype(index_dtype(flat.size))
        values = flat[index]
    if codec.values == "int8":
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        fields[VALUE] = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        fields[SCALE] = np.asarray([scale], dtype=np.float32)
    elif codec.values == "sign":  # mean |v| is the scale that minimises ||v - s sign(v)||
        fields[VALUE] = np.packbits(values > 0)
        scale = float(np.abs(values).mean(dtype=np.float64)) if values.size else 0.0
        fields[SCALE] = np.asarray([scale], dtype=np.float32)
    else:
        fields[VALUE] = values.astype(VALUE_TYPES[codec.values])
    return fields


def decode_tensor(key: str, fields: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 tensor of ``shape`` that ``fields`` encode; validates every field."""
    if VALUE not in fields:
        raise CompressionError(f"'{key}': encoded tensor lacks its values")
    numel = math.prod(shape)
    values = np.asarray(fields[VALUE])
    if values.ndim != 1:
        raise CompressionError(f"'{key}': values must be 1-D, got shape {values.shape}")
    if INDEX not in fields:
        if _stored_length(values, numel) != values.size:
            raise CompressionError(
                f"'{key}': {_held(values, numel)} without indices for a tensor of {numel}"
            )
        return _dequantise(key, values, fields.get(SCALE), numel).reshape(shape)
    index = np.asarray(fields[INDEX])
    if index.ndim != 1:
        raise CompressionError(f"'{key}': indices must be 1-D, got shape {index.shape}")
    if index.dtype.kind != "u":
        raise CompressionError(f"'{key}': index dtype {index.dtype} is not an unsigned integer")
    if _stored_length(values, index.size) != values.size:
        raise CompressionError(
            f"'{key}': {index.size} indices but {_held(values, index.size)} (lengths must match)"
        )
    if index.size > numel:
        raise CompressionError(f"'{key}': {index.size} entries for a tensor of {numel}")
    if index.size and int(index.max()) >= numel:
        raise CompressionError(f"'{key}': index {int(index.max())} out of range [0, {numel})")
    if index.size > 1 and not np.all(np.diff(index.astype(np.int64)) > 0):
        raise CompressionError(f"'{key}': indices are not strictly increasing (duplicates?)")
    dense_values = _dequantise(key, values, fields.get(SCALE), index.size)
    out = np.zeros(numel, dtype=np.float32)
    out[index.astype(np.int64)] = dense_values
    return out.reshape(shape)


def _is_sign(values: np.ndarray) -> bool:
    return values.dtype == VALUE_TYPES["sign"]


def _stored_length(values: np.ndarray, count: int) -> int:
    """How many elements the values field of ``count`` entries has (sign: 8 to a byte)."""
    return (count + 7) // 8 if _is_sign(values) else count


def _held(values: np.ndarray, count: int) -> str:
    """What a values field holds, for an error message about ``count`` entries."""
    if _is_sign(values):
        return f"{values.size} byte(s) of sign bits ({count} signs take {(count + 7) // 8})"
    return f"{values.size} values"


def _dequantise(key: str, values: np.ndarray, scale: np.ndarray | None, count: int) -> np.ndarray:
    """The ``count`` float32 values a values field holds (its length is already checked)."""
    if values.dtype == np.int8:
        with np.errstate(over="ignore"):
            out = values.astype(np.float32) * _scale(key, scale, zero_ok=False)
    elif _is_sign(values):
        if count % 8 and values[-1] & ((1 << (8 - count % 8)) - 1):
            raise CompressionError(f"'{key}': sign bits past the last of {count} entries are set")
        s = _scale(key, scale, zero_ok=True)
        return np.where(np.unpackbits(values, count=count).astype(bool), s, -s)
    elif values.dtype in (np.float32, np.float16):
        out = values.astype(np.float32)
    else:
        raise CompressionError(
            f"'{key}': value dtype {values.dtype} is not one of float32, float16, int8, "
            "uint8 (sign bits)"
        )
    if not np.all(np.isfinite(out)):
        raise CompressionError(f"'{key}': values contain NaN or inf (or overflow float32)")
    return out


def _scale(key: str, scale: np.ndarray | None, *, zero_ok: bool) -> np.float32:
    """The one finite float32 scale of an int8 (positive) or sign tensor (zero: all zero)."""
    if scale is None:
        raise CompressionError(f"'{key}': quantised values without a scale")
    scale = np.asarray(scale)
    if scale.shape != (1,) or scale.dtype != np.float32:
        raise CompressionError(
            f"'{key}': scale must be one float32, got {scale.dtype} {scale.shape}"
        )
    s = scale[0]
    if not np.isfinite(s) or s < 0 or (s == 0 and not zero_ok):
        bound = "non-negative" if zero_ok else "positive"
        raise CompressionError(f"'{key}': scale is {float(s)}, must be finite and {bound}")
    return s


def names_digest(names: Sequence[str]) -> np.ndarray:
    """CRC32 of the sorted encoded tensor names: both ends check they mean the same tensors."""
    return np.asarray([zlib.crc32("\n".join(sorted(names)).encode("utf-8"))], dtype=np.uint32)


def encode(tensors: Mapping[str, np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
    """The wire form of ``tensors`` (as they are under the identity codec).

    Tensor i of the sorted names goes under short keys ``#<i>i``, ``#<i>v``, ``#<i>s``
    (at low density a 70-character peft key would outweigh the data), and ``#names``
    holds :func:`names_digest` of the names.
    """
    if codec.identity:
        return {k: np.asarray(v) for k, v in tensors.items()}
    out: dict[str, np.ndarray] = {NAMES: names_digest(list(tensors))}
    for i, key in enumerate(sorted(tensors)):
        for letter, field in encode_tensor(tensors[key], codec).items():
            out[f"#{i}{letter}"] = field
    return out


def is_encoded(wire: Mapping[str, np.ndarray]) -> bool:
    """Whether ``wire`` carries encoded tensors (besides any dense ones)."""
    return any(k.startswith("#") for k in wire)


def decode(
    wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Dense tensors of exactly the keys and shapes in ``shapes``.

    A key present by name in ``wire`` came dense; the others, in sorted order, are the
    encoded ones, which ``#names`` must confirm. Anything else in ``wire`` is an error.
    """
    dense = {k: np.asarray(v) for k, v in wire.items() if not k.startswith("#")}
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise CompressionError(f"unexpected tensor(s) {unknown[:3]} in the update")
    encoded = sorted(set(shapes) - set(dense))
    fields: list[dict[str, np.ndarray]] = [{} for _ in encoded]
    for name, value in wire.items():
        if not name.startswith("#") or name == NAMES:
            continue
        number, letter = name[1:-1], name[-1:]
        if not number.isdigit() or int(number) >= len(encoded) or letter not in FIELDS:
            raise CompressionError(f"unknown field '{name}' (expected {len(encoded)} tensors)")
        fields[int(number)][letter] = value
    if encoded:
        digest = np.asarray(wire.get(NAMES, np.zeros(0, np.uint32)))
        if digest.shape != (1,) or digest.dtype != np.uint32:
            raise CompressionError(f"'{NAMES}' is missing or malformed")
        if int(digest[0]) != int(names_digest(encoded)[0]):
            raise CompressionError(
                f"encoded tensors are not the expected {len(encoded)} "
                f"({', '.join(encoded[:2])}, ...): names digest differs"
            )
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key in dense:
            value = dense[key]
            if value.shape != tuple(shape):
                raise CompressionError(f"'{key}': shape {value.shape}, expected {tuple(shape)}")
            if value.dtype.kind != "f":
                raise CompressionError(f"'{key}': dtype {value.dtype} is not a float type")
            out[key] = value.astype(np.float32, copy=False)
        else:
            out[key] = decode_tensor(key, fields[encoded.index(key)], tuple(shape))
    return out


def with_feedback(
    update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray], codec: Codec
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode ``update + residual``; return the wire form and the new residual.

    The residual is what was not sent (dropped entries and quantisation error), so
    over rounds sum(sent) + final residual = sum(update) up to float32 rounding.
    A residual whose shape no longer matches its tensor is dropped.
    """
    total = {}
    for key, value in update.items():
        r = residual.get(key)
        total[key] = value if r is None or r.shape != value.shape else value + r
    wire = encode(total, codec)
    sent = decode(wire, {k: v.shape for k, v in total.items()})
    return wire, {k: (total[k] - sent[k]).astype(np.float32) for k in total}


def dense_bytes(shapes: Iterable[tuple[int, ...]]) -> int:
    """Size of the same tensors sent dense in float32."""
    return sum(4 * math.prod(s) for s in shapes)
