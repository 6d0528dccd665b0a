"""How a node's model update travels: the difference to the global model, in float16.

A node's training reply used to carry its whole new model in float32, one NumPy array per
parameter (each with its 128-byte ``.npy`` header). It now carries one vector: the update
``local - global`` of every parameter, in sorted name order, as float16 (2 bytes a
number, no header). The coordinator adds it back to the global model it sent.

Why float16 is enough: an update is small (a learning rate times a few gradient steps), and
float16 keeps about three significant digits of each number, a relative error of at most
2^-11 = 0.05%. Under DP-SGD the Gaussian noise in the update is far larger than that, and
rounding a released value is post-processing: it costs no privacy. ``training.update_encoding
= "float32"`` sends the exact update instead (4 bytes a number).

An update too large for float16 (above 65504 in some coordinate) becomes infinite and the
coordinator's screening leaves it out, as it leaves out any non-finite update.

The coordinator accepts either form (a node may send whole float32 models); names and shapes
are checked against the global model by the screening that follows. Free of I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["UPDATE", "encode_update", "is_encoded", "local_model", "pack", "unpack"]

UPDATE = "fedgov-update"
"""The one array of an encoded reply."""

_STYPES = {"float16-delta": "fedgov/float16-delta", "float32-delta": "fedgov/float32-delta"}
_DTYPES = {"fedgov/float16-delta": np.float16, "fedgov/float32-delta": np.float32}


def encode_update(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], *, encoding: str = "float16-delta") -> Array:
    """``local - global`` of every parameter (by sorted name) as one raw vector."""
    if encoding not in _STYPES:
        raise ValueError(f"unknown update encoding {encoding!r}; expected one of {sorted(_STYPES)}")
    missing = [k for k in global_ if k not in local]
    if missing:
        raise ValueError(f"the local model lacks parameters of the global model: {missing}")
    stype = _STYPES[encoding]
    dtype = _DTYPES[stype]
    delta = np.concatenate(
        [(np.asarray(local[k], dtype=np.float64) - np.asarray(global_[k], dtype=np.float64)).ravel() for k in sorted(global_)]
    ) if global_ else np.zeros(0)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, left out by the screening
        data = delta.astype(dtype)
    return Array(dtype=np.dtype(dtype).name, shape=(int(data.size),), stype=stype, data=data.tobytes())


def is_encoded(record: ArrayRecord) -> bool:
    """True when ``record`` holds an encoded update rather than whole arrays."""
    return list(record.keys()) == [UPDATE] and record[UPDATE].stype in _DTYPES


def _vector(array: Array) -> np.ndarray:
    dtype = _DTYPES.get(array.stype)
    if dtype is None:
        raise ValueError(f"array '{UPDATE}' has stype {array.stype!r}, expected one of {sorted(_DTYPES)}")
    if len(array.data) % np.dtype(dtype).itemsize:
        raise ValueError(f"array '{UPDATE}' holds {len(array.data)} bytes, not a whole number of {np.dtype(dtype).name}")
    return np.frombuffer(array.data, dtype=dtype)


def local_model(record: ArrayRecord, global_: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The node's model from its reply: ``global + update`` for an encoded reply, the arrays as
    sent otherwise. Raises ``ValueError`` when the update does not fit the global model."""
    if not is_encoded(record):
        return {k: v.numpy() for k, v in record.items()}
    vec = _vector(record[UPDATE])
    need = sum(int(np.asarray(v).size) for v in global_.values())
    if vec.size != need:
        raise ValueError(f"the update has {vec.size} numbers, the global model {need} parameters")
    out: dict[str, np.ndarray] = {}
    at = 0
    for k in sorted(global_):
        g = np.asarray(global_[k])
        part = vec[at : at + g.size].astype(np.float64).reshape(g.shape)
        out[k] = (g.astype(np.float64) + part).astype(g.dtype)
        at += g.size
    return out


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record as NumPy arrays, an encoded update as its raw vector (to keep)."""
    if is_encoded(record):
        arr = record[UPDATE]
        return {UPDATE: _vector(arr).copy(), "__stype__": np.frombuffer(arr.stype.encode(), dtype=np.uint8).copy()}
    return {k: v.numpy() for k, v in record.items()}


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The inverse of :func:`unpack`: the same record again."""
    if UPDATE in arrays and "__stype__" in arrays:
        vec = np.asarray(arrays[UPDATE])
        stype = bytes(np.asarray(arrays["__stype__"], dtype=np.uint8)).decode()
        return ArrayRecord({UPDATE: Array(dtype=vec.dtype.name, shape=(int(vec.size),), stype=stype, data=vec.tobytes())})
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
