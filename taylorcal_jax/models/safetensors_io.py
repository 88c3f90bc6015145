"""Minimal safetensors reader/writer on numpy (bfloat16 via ml_dtypes), with strict checks.

File layout: u64 little-endian header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
byte buffer (offsets are relative to its start). Reading memory-maps the file and checks every
tensor's extent against the file size, so truncated or corrupt files fail with a clear error
instead of returning garbage. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from taylorcal_jax.utils import files

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class CorruptCheckpointError(ValueError):
    """A weights file is truncated, corrupt or inconsistent with its index."""


def read_header(path) -> tuple[dict, int]:
    """Returns (header dict without metadata, byte offset of the data buffer)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: too short to be a safetensors file ({size} B)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: header length {n} does not fit the file ({size} B); the file is "
                "truncated or not safetensors. Re-download or re-save it."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(
                f"{path}: bad or unsupported header entry for {name!r}: {info} ({e!r}); "
                f"supported dtypes: {', '.join(DTYPES)}"
            ) from e
        if end > data_size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} but the data section has only "
                f"{data_size} bytes; the file is truncated. Re-download or re-save it."
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                f"of {info['dtype']}"
            )
    return header, data_start


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only memory-mapped numpy arrays."""
    header, data_start = read_header(path)
    if not header:
        return {}
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        chunk = buf[data_start + begin : data_start + end]
        out[name] = chunk.view(dtype).reshape(tuple(info["shape"]))
    return out


def write_tensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes numpy arrays (C-contiguous copies) as one safetensors file, names sorted."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        # ascontiguousarray makes a 0-d array 1-d: reshape keeps a scalar a scalar
        arr = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {arr.dtype} in safetensors")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with files.replaced_when_done(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.reshape(-1).view(np.uint8).data)
