"""Adapters as Flower ArrayRecords and back, trusting nothing a peer sends.

Arrays travel as raw little-endian bytes with dtype and shape (never pickle). The
reader checks every field before it allocates: a reply comes from a peer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.lora.state import AdapterError

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
