"""Vocabulary mapping: source token id -> target token id, by the tokens' normalised bytes.

Tokens are compared by the bytes they stand for (``fastfuse.align.surface.token_surfaces``):
SentencePiece ``▁`` is a space, byte-level BPE characters are mapped back to bytes, ``<0xNN>``
is one byte. The work is done once per (source, target) pair in C++ (``fastfuse._C.map_vocab``)
and cached to disk with :meth:`VocabMap.save` / :meth:`VocabMap.load`.

Two modes:

``"exact"``
    Source token -> the smallest target id with identical bytes. Special (control) tokens only
    match special tokens and ordinary tokens only ordinary tokens; empty tokens map to nothing.
``"mined"``
    Exact first. An ordinary, non-empty source token without an exact match then maps to the
    ordinary, non-empty target token at minimum byte-level Levenshtein distance (unit costs);
    **ties are broken by the smallest target id**. Special tokens are never mapped by distance.

:func:`reference_vocab_map` is the same computation in plain Python (slow; the tests compare
the two on random vocabularies).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastfuse import _C
from fastfuse.storage import atomic_write, serialize_safetensors
from fastfuse.align.native_threads import check_num_threads

__all__ = ["VocabMap", "reference_vocab_map", "levenshtein_reference"]

MODES = ("exact", "mined")
_FORMAT = "fastfuse.VocabMap"
_FORMAT_VERSION = "1"


def _check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def _pack(tokens: Any, name: str) -> tuple[bytes, np.ndarray]:
    """list[bytes] -> (one concatenated buffer, int64 offsets[n + 1])."""
    if isinstance(tokens, (str, bytes, bytearray, memoryview)) or not isinstance(tokens, Sequence):
        raise TypeError(f"{name}: expected a list of bytes (one entry per token id), got {type(tokens).__name__}")
    if not all(isinstance(t, (bytes, bytearray)) for t in tokens):
        k = next(k for k, t in enumerate(tokens) if not isinstance(t, (bytes, bytearray)))
        raise TypeError(f"{name}[{k}]: expected bytes, got {type(tokens[k]).__name__} ({tokens[k]!r:.60})")
    n = len(tokens)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, tokens), dtype=np.int64, count=n), out=offsets[1:])
    return b"".join(tokens), offsets


def _special_mask(mask: Any, n: int, name: str) -> np.ndarray:
    """None or array-like of n bools (0/1 integers accepted) -> bool[n]."""
    if mask is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or arr.size and not np.isin(arr, (0, 1)).all():
            raise TypeError(f"{name}: expected a bool array (True = special token), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (one flag per token id), got {arr.shape}")
    return np.ascontiguousarray(arr)


class VocabMap:
    """Source token id -> target token id.

    Attributes:
        ids: int32 ``[S]``, target id or -1 (unmapped), S = source vocabulary size.
        distance: int32 ``[S]``, 0 for exact matches, the byte edit distance for mined ones,
            -1 where unmapped.
        src_special: bool ``[S]``, which source ids are special tokens.
        mode: ``"exact"`` or ``"mined"`` (module docstring gives the rules).
        tgt_size: target vocabulary size T (every mapped id is < T).
    """

    def __init__(self, ids: np.ndarray, distance: np.ndarray, mode: str, tgt_size: int,
                 src_special: np.ndarray | None = None) -> None:
        self.mode = _check_mode(mode)
        ids = np.asarray(ids)
        distance = np.asarray(distance)
        if ids.ndim != 1 or ids.dtype != np.int32:
            raise ValueError(f"ids: expected a 1-D int32 array, got {ids.dtype} with shape {ids.shape}")
        if distance.shape != ids.shape or distance.dtype != np.int32:
            raise ValueError(f"distance: expected int32 with shape {ids.shape}, got {distance.dtype} {distance.shape}")
        if isinstance(tgt_size, bool) or not isinstance(tgt_size, (int, np.integer)) or tgt_size < 0:
            raise ValueError(f"tgt_size: expected an int >= 0, got {tgt_size!r}")
        if ids.size and (ids.min() < -1 or ids.max() >= tgt_size):
            raise ValueError(f"ids: values must be -1 or in [0, {tgt_size}), got range [{ids.min()}, {ids.max()}]")
        if not np.array_equal(ids < 0, distance < 0):
            raise ValueError("distance: must be -1 exactly where ids is -1")
        self.ids = ids
        self.distance = distance
        self.tgt_size = int(tgt_size)
        self.src_special = _special_mask(src_special, ids.shape[0], "src_special")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_token_bytes(cls, src_bytes: list[bytes], tgt_bytes: list[bytes], mode: str = "exact",
                         src_special: np.ndarray | None = None, tgt_special: np.ndarray | None = None,
                         num_threads: int = 0) -> "VocabMap":
        """Map from the normalised bytes of each token id.

        Args:
            src_bytes: ``list[bytes]`` of length S, the bytes of source token id k at index k.
            tgt_bytes: ``list[bytes]`` of length T, the same for the target.
            mode: ``"exact"`` or ``"mined"``; in mined mode distance ties go to the smallest
                target id.
            src_special / tgt_special: bool ``[S]`` / ``[T]`` or None (no special tokens).
            num_threads: worker threads for the mined search, 0 = all cores. The GIL is released.
        """
        mode = _check_mode(mode)
        num_threads = check_num_threads(num_threads)
        sbuf, soff = _pack(src_bytes, "src_bytes")
        tbuf, toff = _pack(tgt_bytes, "tgt_bytes")
        ss = _special_mask(src_special, len(src_bytes), "src_special")
        ts = _special_mask(tgt_special, len(tgt_bytes), "tgt_special")
        ids, distance = _C.map_vocab(sbuf, soff, ss, tbuf, toff, ts, mode == "mined", num_threads)
        return cls(ids, distance, mode, len(tgt_bytes), ss)

    @classmethod
    def build(cls, src_tokenizer: Any, tgt_tokenizer: Any, mode: str = "exact", num_threads: int = 0) -> "VocabMap":
        """Map between two tokenizers through ``fastfuse.align.surface.token_surfaces``."""
        from fastfuse.align.surface import token_surfaces

        mode = _check_mode(mode)
        num_threads = check_num_threads(num_threads)  # before the slow part
        s = token_surfaces(src_tokenizer)
        t = token_surfaces(tgt_tokenizer)
        return cls.from_token_bytes(s.bytes, t.bytes, mode, s.special, t.special, num_threads)

    # ---------------------------------------------------------------- summaries
    @property
    def src_size(self) -> int:
        return int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.src_size

    @property
    def exact_rate(self) -> float:
        """Fraction of non-special source tokens with an exact match (0.0 when there are none)."""
        ordinary = ~self.src_special
        n = int(ordinary.sum())
        return float(((self.distance == 0) & ordinary).sum() / n) if n else 0.0

    def stats(self) -> dict[str, Any]:
        """Counts and rates: exact / mined / unmapped, special tokens, mined distances."""
        exact = self.distance == 0
        mined = self.distance > 0
        md = self.distance[mined]
        return {
            "mode": self.mode,
            "src_size": self.src_size,
            "tgt_size": self.tgt_size,
            "n_special": int(self.src_special.sum()),
            "n_exact": int(exact.sum()),
            "n_mined": int(mined.sum()),
            "n_unmapped": int((self.ids < 0).sum()),
            "exact_rate": self.exact_rate,
            "mapped_rate": float((self.ids >= 0).mean()) if self.src_size else 0.0,
            "mean_mined_distance": float(md.mean()) if md.size else 0.0,
            "max_distance": int(self.distance.max()) if self.src_size else -1,
        }

    def __repr__(self) -> str:
        return (f"VocabMap(mode={self.mode!r}, src_size={self.src_size}, tgt_size={self.tgt_size}, "
                f"exact_rate={self.exact_rate:.4f}, unmapped={int((self.ids < 0).sum())})")

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically and byte-deterministically (``fastfuse.storage``): the
        same map always gives the same bytes, so alignment outputs can be compared by checksum."""
        tensors = {"ids": self.ids, "distance": self.distance, "src_special": self.src_special.astype(np.uint8)}
        metadata = {"format": _FORMAT, "version": _FORMAT_VERSION, "mode": self.mode,
                    "src_size": str(self.src_size), "tgt_size": str(self.tgt_size)}
        atomic_write(Path(path), serialize_safetensors(tensors, metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VocabMap":
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such VocabMap file")
        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != _FORMAT or not {"ids", "distance", "src_special"} <= keys:
                    raise ValueError("missing fastfuse.VocabMap metadata or tensors")
                ids, distance, special = (f.get_tensor(k) for k in ("ids", "distance", "src_special"))
            if special.dtype != np.uint8:
                raise ValueError(f"src_special has dtype {special.dtype}, expected uint8")
            vm = cls(ids, distance, _check_mode(meta.get("mode")), int(meta["tgt_size"]), special.astype(bool))
            if vm.src_size != int(meta["src_size"]):
                raise ValueError(f"src_size metadata {meta['src_size']} != {vm.src_size} ids")
            return vm
        except Exception as e:  # safetensors raises its own error types for non-safetensors files
            raise ValueError(f"{path}: not a valid fastfuse VocabMap file ({e})") from e


# -------------------------------------------------------------------- reference
def levenshtein_reference(a: bytes, b: bytes) -> int:
    """Byte-level Levenshtein distance, plain Python two-row DP."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def reference_vocab_map(src_bytes: Sequence[bytes], tgt_bytes: Sequence[bytes], mode: str = "exact",
                        src_special: Sequence[bool] | None = None, tgt_special: Sequence[bool] | None = None,
                        src_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force pure-Python :meth:`VocabMap.from_token_bytes` -> (ids, distance), int32.

    ``src_ids`` restricts the work to those source ids (the other entries are -1); the
    benchmark uses it on a sample. Quadratic: for tests and benchmarks only.
    """
    mode = _check_mode(mode)
    ss = [False] * len(src_bytes) if src_special is None else [bool(x) for x in src_special]
    ts = [False] * len(tgt_bytes) if tgt_special is None else [bool(x) for x in tgt_special]
    ids = np.full(len(src_bytes), -1, dtype=np.int32)
    dist = np.full(len(src_bytes), -1, dtype=np.int32)
    for k in range(len(src_bytes)) if src_ids is None else src_ids:
        s = bytes(src_bytes[k])
        if not s:
            continue
        same = [j for j, t in enumerate(tgt_bytes) if ts[j] == ss[k] and bytes(t) == s]
        if same:
            ids[k], dist[k] = min(same), 0
        elif mode == "mined" and not ss[k]:
            cands = [(levenshtein_reference(s, bytes(t)), j) for j, t in enumerate(tgt_bytes) if t and not ts[j]]
            if cands:
                dist[k], ids[k] = min(cands)
    return ids, dist
