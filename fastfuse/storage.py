"""Writing and reading data files safely: atomic writes, deterministic safetensors, checksums.

Every file fastfuse writes goes through :func:`atomic_write` (temp file in the same directory, fsync,
rename, fsync of the directory), so a killed job leaves either the old file or the new one, never a
torn one; safetensors and JSON are written byte-deterministically so a resumed job can be checked
byte for byte against an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "sha256_file", "json_bytes", "serialize_safetensors", "read_safetensors"]

_ST_DTYPE: dict[np.dtype[Any], str] = {np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.float32): "F32",
             np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8"}
_NP_DTYPE = {v: k for k, v in _ST_DTYPE.items()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``path`` through a temp file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed write (disk full, EFBIG, Ctrl-C) leaves the old file and no temp file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def serialize_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> list[bytes]:
    """Deterministic safetensors bytes: tensors in the given order, sorted JSON, 8-byte aligned header.

    Written by hand because the ``safetensors`` library serialises ``__metadata__`` from a Rust
    HashMap, whose order changes from process to process (measured: four runs, four different
    sha256), which would break byte-identical resumes. The ``safetensors`` loader reads these files.
    """
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    pos = 0
    datas = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_DTYPE:
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPE[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + len(b)]}
        pos += len(b)
        datas.append(b)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return [struct.pack("<Q", len(hb)), hb, *datas]


def read_safetensors(path: Path, sha256: str | None = None,
                     mismatch: str = "sha256 differs from its record") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file written by :func:`serialize_safetensors`; ``ValueError`` naming the
    file if it is missing, truncated or malformed, or (``f"{path}: {mismatch}"``) if ``sha256`` is
    given and the bytes read hash otherwise -- checked on the one read, before parsing."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: {mismatch}")
    try:
        if len(raw) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw[:8])
        if 8 + n > len(raw):
            raise ValueError(f"header of {n} bytes runs past the end of the file ({len(raw)} bytes)")
        header = json.loads(raw[8:8 + n])
        meta = header.pop("__metadata__", {}) or {}
        data = memoryview(raw)[8 + n:]
        out = {}
        end = 0
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            dt = _NP_DTYPE[info["dtype"]]
            shape = tuple(info["shape"])
            if not (0 <= lo <= hi <= len(data)) or hi - lo != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise ValueError(f"tensor {name!r} has data offsets [{lo}, {hi}) inconsistent with its shape "
                                 f"{list(shape)} or the file size (truncated?)")
            out[name] = np.frombuffer(data[lo:hi], dtype=dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)
            end = max(end, hi)
        if end != len(data):
            raise ValueError(f"{len(data) - end} trailing bytes after the last tensor")
    except ValueError as e:
        raise ValueError(f"{path}: corrupted shard: {e}") from e
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupted shard: bad header ({e!r})") from e
    return out, meta


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON file bytes: indented, sorted keys, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
