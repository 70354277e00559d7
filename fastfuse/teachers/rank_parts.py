"""One source's top-k shards written by several ranks, read back as one source (DESIGN.md §3).

A distributed extraction (``torchrun ... -m fastfuse extract``, or ``extract_topk(..., rank=r,
world_size=n)``) cuts the corpus's sequences into ``n`` contiguous ranges of about equal token
counts (:func:`token_ranges`) and rank ``r`` writes range ``r`` as an ordinary shard directory::

    OUT/rank-00000-of-00002/meta.json, shard-00000.safetensors, ...   sequences [0, s1)
    OUT/rank-00001-of-00002/meta.json, shard-00000.safetensors, ...   sequences [s1, N)

Each part's ``meta.json`` carries a ``partition`` record (``rank``, ``world_size``, ``seq_start``,
``seq_end``, ``corpus_sequences``, ``corpus_tokens``); its shards hold global sequence indices.
A part resumes alone, byte-identically, like a one-process run. :func:`open_shards` reads either
layout: a plain shard directory as :class:`~fastfuse.teachers.shards.ShardReader`, a parted one as
:class:`PartsReader` (the same interface, sequences in corpus order).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastfuse.teachers.shards import IDENTITY_KEYS, META_NAME, ShardReader

__all__ = ["part_name", "token_ranges", "find_parts", "check_layout", "PartsReader", "open_shards"]

_PART = re.compile(r"rank-(\d{5,})-of-(\d{5,})")


def part_name(rank: int, world_size: int) -> str:
    """The directory of rank ``rank``'s part: ``rank-00000-of-00002``."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


def token_ranges(lengths: np.ndarray | list[int], world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` sequence ranges, one per rank, of about ``total / world_size``
    tokens each: cut ``r`` goes at the sequence boundary whose token prefix sum is nearest to
    ``r * total / world_size`` (ties to the earlier one). Integer arithmetic only, so every rank
    computes the same cuts from the same lengths; a rank may get an empty range."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    cum = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])
    total, n = int(cum[-1]), len(cum) - 1
    scaled = cum * world_size     # compare prefix sums x world_size with total x r: no rounding
    cuts = [0]
    for r in range(1, world_size):
        goal = total * r
        i = int(np.searchsorted(scaled, goal, side="left"))      # first prefix reaching the goal
        if i > 0 and goal - int(scaled[i - 1]) <= int(scaled[i]) - goal:
            i -= 1
        cuts.append(max(i, cuts[-1]))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def find_parts(out_dir: str | os.PathLike) -> dict[int, list[Path]]:
    """``{world size: [part directories]}`` under ``out_dir`` (by directory name)."""
    found: dict[int, list[Path]] = {}
    root = Path(out_dir)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            m = _PART.fullmatch(p.name)
            if m and p.is_dir():
                found.setdefault(int(m.group(2)), []).append(p)
    return found


def check_layout(out_dir: str | os.PathLike, world_size: int) -> None:
    """Refuse to write a run of ``world_size`` processes where another world size has written
    (``ValueError`` naming ``out_dir``): the parts of two partitions would mix."""
    root = Path(out_dir)
    other = sorted(w for w in find_parts(root) if w != world_size)
    if world_size > 1 and (root / META_NAME).exists():
        other = [1] + other
    if other:
        raise ValueError(f"out_dir: {root} holds an extraction with world size {other[0]}, this run has "
                         f"world size {world_size}; use the same world size or another output directory")


class PartsReader:
    """All ranks' parts of ``out_dir`` as one source, sequences in corpus order: ``len``,
    ``reader[i]``, iteration, ``ce``, ``meta`` (the parts' common settings, their totals and
    ``shards``: every part's shard entries in rank order, files named ``rank-.../shard-...``),
    ``complete``, ``num_tokens``, ``verify()``, ``bytes_per_token()``.

    Opening checks that there is one world size, that every rank's part exists and is complete,
    that the parts were written with the same settings and that their ranges tile the corpus;
    every problem is a ``ValueError`` naming the part.
    """

    def __init__(self, out_dir: str | os.PathLike, check_sha256: bool = True):
        self.out_dir = Path(out_dir)
        found = find_parts(self.out_dir)
        if len(found) != 1:
            raise ValueError(f"{self.out_dir}: parts of several world sizes {sorted(found)} (from runs with "
                             "different --world-size); keep one set" if found else
                             f"{self.out_dir}: no {META_NAME} and no rank-*-of-* parts (not a shard directory)")
        (world, dirs), = found.items()
        names = {p.name for p in dirs}
        self.parts: list[ShardReader] = []
        for r in range(world):
            d = self.out_dir / part_name(r, world)
            if d.name not in names:
                raise ValueError(f"{d}: missing (rank {r} of {world} has not written its part; run it with "
                                 f"--rank {r} --world-size {world})")
            part = ShardReader(d, check_sha256=check_sha256)
            if not part.complete:
                raise ValueError(f"{d}: incomplete (rank {r} of {world} has not finished; rerun it with "
                                 f"--rank {r} --world-size {world} to resume)")
            self._check_part(d, part, r, world)
            self.parts.append(part)
        self.k = self.parts[0].k
        self._ends = np.cumsum([len(p) for p in self.parts])
        first = self.parts[0].meta
        self.meta: dict[str, Any] = {k: first.get(k) for k in IDENTITY_KEYS if k != "partition"}
        self.meta.update(
            model=first["model"], tokenizer_size=first["tokenizer_size"], world_size=world, complete=True,
            num_sequences=int(self._ends[-1]), num_tokens=sum(p.num_tokens for p in self.parts),
            shards=[{**s, "file": f"{p.out_dir.name}/{s['file']}"} for p in self.parts for s in p.meta["shards"]])

    def _check_part(self, d: Path, part: ShardReader, r: int, world: int) -> None:
        got = part.meta.get("partition")
        if got is None or got["rank"] != r or got["world_size"] != world:
            raise ValueError(f"{d / META_NAME}: partition {got!r} does not name rank {r} of {world}")
        if not self.parts:
            return
        prev = self.parts[-1].meta
        diff = [k for k in IDENTITY_KEYS if k != "partition" and prev.get(k) != part.meta.get(k)]
        if diff:
            raise ValueError(f"{d}: written with other settings than {self.parts[-1].out_dir.name} ({diff}); "
                             "every rank must run the same model, tokenizer and settings")
        pp = prev["partition"]
        if (pp["seq_end"], pp["corpus_sequences"], pp["corpus_tokens"]) != \
                (got["seq_start"], got["corpus_sequences"], got["corpus_tokens"]):
            raise ValueError(f"{d}: its range {got['seq_start']}..{got['seq_end']} of {got['corpus_sequences']} "
                             f"sequences does not follow {self.parts[-1].out_dir.name}'s {pp['seq_start']}.."
                             f"{pp['seq_end']} of {pp['corpus_sequences']} (the ranks read different corpora?)")

    @property
    def complete(self) -> bool:
        return True

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def __len__(self) -> int:
        return int(self.meta["num_sequences"])

    def __getitem__(self, seq_index: int) -> dict[str, Any]:
        """Sequence ``seq_index`` of the corpus (see :meth:`ShardReader.__getitem__`)."""
        n = len(self)
        if not isinstance(seq_index, (int, np.integer)):
            raise TypeError(f"seq_index: expected int, got {type(seq_index).__name__}")
        i = int(seq_index) + n if seq_index < 0 else int(seq_index)
        if not 0 <= i < n:
            raise IndexError(f"seq_index {seq_index} out of range for {n} sequences")
        r = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[r][i - (int(self._ends[r - 1]) if r else 0)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for p in self.parts:
            yield from p

    @property
    def ce(self) -> np.ndarray:
        return np.concatenate([p.ce for p in self.parts])

    def verify(self) -> None:
        for p in self.parts:
            p.verify()

    def bytes_per_token(self) -> float:
        total = sum(s["bytes"] for s in self.meta["shards"]) + \
            sum((p.out_dir / META_NAME).stat().st_size for p in self.parts)
        return total / max(self.num_tokens, 1)


def open_shards(out_dir: str | os.PathLike, check_sha256: bool = True) -> ShardReader | PartsReader:
    """A reader for one source's output, whatever the number of processes that wrote it."""
    root = Path(out_dir)
    if (root / META_NAME).exists() or not find_parts(root):
        if find_parts(root):
            raise ValueError(f"{root}: holds both a one-process {META_NAME} and rank-*-of-* parts; keep one")
        return ShardReader(root, check_sha256=check_sha256)
    return PartsReader(root, check_sha256=check_sha256)
