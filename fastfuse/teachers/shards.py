"""On-disk top-k shards of one source model (DESIGN.md §3): written atomically, read back validated.

A source's output directory holds ``meta.json`` and ``shard-00000.safetensors``,
``shard-00001.safetensors``, ... Each shard holds a contiguous range of sequences, unpadded:

==================  =============================  ==============================================
tensor              dtype / shape                  meaning
==================  =============================  ==============================================
``offsets``         int64 ``[n_seq + 1]``          token offsets into the per-token arrays (from 0)
``topk_ids``        int32 ``[n_tokens, k]``        source-vocab ids of the top-k next tokens; row j
                                                   is the prediction made at position j (token j+1)
``topk_logprobs``   float16 ``[n_tokens, k]``      their log-probs (log_softmax in fp32, then cast)
``ce``              float32 ``[n_seq]``            mean CE of the source on the gold next tokens
                                                   (NaN for a sequence with < 2 tokens)
``seq_index``       int64 ``[n_seq]``              global index of each sequence in the corpus
``doc_spans``       int64 ``[n_seq, 3]``           (document index, char start, char end) of the
                                                   text each sequence was tokenised from
==================  =============================  ==============================================

Every shard carries safetensors metadata (str -> str): ``format_version``, ``source_name``,
``tokenizer_fingerprint``, ``k``, ``vocab_size``, ``first_seq``, ``last_seq`` (inclusive).
The files are written byte-deterministically (fixed tensor order, sorted JSON keys, no
timestamps), so the same inputs always give the same bytes, and atomically (temp file in the
same directory, fsync, ``os.replace``). ``meta.json`` is rewritten the same way after each shard.

``meta.json`` (sorted keys): ``format_version``, ``source_name``, ``model`` (identifier),
``model_fingerprint`` (sha256 of the weights, :func:`fastfuse.teachers.local_extract.model_fingerprint`),
``tokenizer_fingerprint`` (sha256 of ``backend_tokenizer.to_str()``), ``tokenizer_size``
(``len(tokenizer)``), ``vocab_size`` (the model's logits width; may exceed ``tokenizer_size`` for a
padded embedding, whose extra ids never appear in ``topk_ids``), ``k``, ``block_size``,
``token_budget``, ``shard_size``, ``dtype``, ``special_tokens`` ([prefix ids, suffix ids]),
``num_sequences``, ``num_tokens``, ``complete``, ``corpus_fingerprint`` and ``shards``: one entry
per completed shard with ``file``, ``seq_start``, ``seq_end`` (exclusive), ``num_tokens``,
``bytes``, ``sha256`` and the ``corpus_fingerprint`` after it. The corpus fingerprint is a sha256
chain over the sequences (raw digests): ``h_0 = sha256(b"")``, ``h_{i+1} = sha256(h_i || int64 (doc index,
char start, char end) || UTF-8 text of the sequence)``, hex of the last one; a resumed run checks
it at every completed shard boundary.

**Distributed runs** (:mod:`fastfuse.teachers.rank_parts`): with ``world_size > 1`` each rank writes its
contiguous range of the corpus's sequences as a directory of the format above,
``OUT/rank-RRRRR-of-WWWWW/``, whose ``meta.json`` adds ``partition``: ``rank``, ``world_size``,
``seq_start``, ``seq_end`` (its global range), ``corpus_sequences`` and ``corpus_tokens`` (the whole
corpus). Its shards hold global sequence indices (``seq_index``, ``seq_start``/``seq_end`` of shard
entries and the ``first_seq``/``last_seq`` metadata), ``num_sequences``/``num_tokens`` count its own,
and the corpus fingerprint chain starts at the corpus's first sequence, not the rank's.
``partition`` is part of the identity (a resume must cut the corpus the same way) and absent for
one process, whose output is the plain directory above.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastfuse.storage import atomic_write, json_bytes, read_safetensors, serialize_safetensors

FORMAT_VERSION = 1
META_NAME = "meta.json"
_SHA_MISMATCH = "sha256 differs from meta.json (corrupted shard)"
TENSOR_ORDER = ("offsets", "seq_index", "doc_spans", "topk_ids", "ce", "topk_logprobs")
_DTYPES = {"offsets": np.int64, "seq_index": np.int64, "doc_spans": np.int64, "topk_ids": np.int32,
           "ce": np.float32, "topk_logprobs": np.float16}
# Keys of meta.json that must agree between a run and the run it resumes (they change the bytes).
IDENTITY_KEYS = ("format_version", "source_name", "tokenizer_fingerprint", "vocab_size", "k", "block_size",
                 "token_budget", "shard_size", "dtype", "model_fingerprint", "partition")
# model_fingerprint is optional: writers without a model (tests, converters) leave it out; partition
# is only written by one rank of a distributed run (absent, so unchanged bytes, for one process)
REQUIRED_META = tuple(k for k in IDENTITY_KEYS if k not in ("model_fingerprint", "partition")) + \
    ("model", "tokenizer_size")
PARTITION_KEYS = ("rank", "world_size", "seq_start", "seq_end", "corpus_sequences", "corpus_tokens")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a fast tokenizer's serialised backend (``backend_tokenizer.to_str()``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TypeError("tokenizer: a Hugging Face fast tokenizer (with backend_tokenizer) is required")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def load_meta(out_dir: str | os.PathLike) -> dict:
    """``out_dir/meta.json``, checked for shape: ``ValueError`` naming the file for anything that is
    not what :class:`ShardWriter` writes (bad JSON, wrong types, a shard entry naming another file)."""
    path = Path(out_dir) / META_NAME
    try:
        meta = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: not found (not a shard directory, or no shard completed yet)") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META + ("shards", "num_sequences", "num_tokens") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']!r} (this fastfuse reads {FORMAT_VERSION})")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return meta


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def seq_base(meta: dict) -> int:
    """Global index of a shard directory's first sequence: 0, or its rank's ``seq_start``."""
    return int(meta["partition"]["seq_start"]) if meta.get("partition") is not None else 0


def _partition_problem(part: Any) -> str | None:
    if not isinstance(part, dict) or sorted(part) != sorted(PARTITION_KEYS) or \
            not all(_is_int(part[k]) for k in PARTITION_KEYS):
        return f"partition must map {list(PARTITION_KEYS)} to non-negative integers, got {part!r}"
    if not (part["rank"] < part["world_size"] and part["seq_start"] <= part["seq_end"] <= part["corpus_sequences"]):
        return f"partition is inconsistent (rank < world_size, seq_start <= seq_end <= corpus_sequences): {part}"
    return None


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a parsed meta.json's types and shard list, or None."""
    if meta.get("partition") is not None and _partition_problem(meta["partition"]):
        return _partition_problem(meta["partition"])
    for k in ("k", "vocab_size", "tokenizer_size", "block_size", "token_budget", "shard_size"):
        if k in meta and not _is_int(meta[k], 1):
            return f"{k} must be a positive integer, got {meta[k]!r}"
    for k in ("num_sequences", "num_tokens"):
        if not _is_int(meta[k]):
            return f"{k} must be a non-negative integer, got {meta[k]!r}"
    for k in ("source_name", "tokenizer_fingerprint"):
        if not isinstance(meta[k], str):
            return f"{k} must be a string, got {meta[k]!r}"
    if not isinstance(meta["shards"], list):
        return f"shards must be a list, got {type(meta['shards']).__name__}"
    for i, e in enumerate(meta["shards"]):
        if not isinstance(e, dict):
            return f"shards[{i}] must be an object, got {e!r}"
        if e.get("file") != shard_name(i):
            return f"shards[{i}].file must be {shard_name(i)!r}, got {e.get('file')!r}"
        for k in ("seq_start", "seq_end", "num_tokens", "bytes"):
            if not _is_int(e.get(k)):
                return f"shards[{i}].{k} must be a non-negative integer, got {e.get(k)!r}"
        for k in ("sha256", "corpus_fingerprint"):
            if not isinstance(e.get(k), str):
                return f"shards[{i}].{k} must be a string, got {e.get(k)!r}"
    return None


class ShardWriter:
    """Writes shards of one source into ``out_dir``, resuming a previous run there if any.

    ``meta`` holds at least :data:`REQUIRED_META` (``format_version`` may be left out). When
    ``out_dir/meta.json`` exists, its :data:`IDENTITY_KEYS` must equal ``meta``'s (else
    ``ValueError`` naming every key that differs), its shards must exist with the recorded size,
    and :attr:`next_seq` / :attr:`next_shard` say where to continue. Stray temp files of an
    interrupted write are removed.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: dict):
        self.out_dir = Path(out_dir)
        meta = {"format_version": FORMAT_VERSION, **meta}
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"meta: missing keys {missing}")
        if meta.get("partition") is not None and _partition_problem(meta["partition"]):
            raise ValueError(f"meta: {_partition_problem(meta['partition'])}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in self.out_dir.glob(".*.tmp"):
            p.unlink()
        if (self.out_dir / META_NAME).exists():
            old = load_meta(self.out_dir)
            diff = [f"{k}: {old.get(k)!r} in {self.out_dir / META_NAME}, {meta.get(k)!r} now"
                    for k in IDENTITY_KEYS if old.get(k) != meta.get(k)]
            if diff:
                raise ValueError(f"cannot resume in {self.out_dir}: it was written with other settings ("
                                 + "; ".join(diff) + "); use another output directory or delete it")
            for s in old["shards"]:
                p = self.out_dir / s["file"]
                if not p.exists() or p.stat().st_size != s["bytes"]:
                    raise ValueError(f"{p}: missing or truncated shard listed in {self.out_dir / META_NAME}")
            self.meta = {**old, "model": meta["model"]}
        else:
            self.meta = {**meta, "shards": [], "num_sequences": 0, "num_tokens": 0, "complete": False,
                         "corpus_fingerprint": hashlib.sha256(b"").hexdigest()}

    @property
    def next_seq(self) -> int:
        """Global index of the first sequence not yet written (a rank's part starts at its seq_start)."""
        return seq_base(self.meta) + int(self.meta["num_sequences"])

    @property
    def next_shard(self) -> int:
        return len(self.meta["shards"])

    @property
    def corpus_fingerprint(self) -> str:
        """Running sha256 chain over the sequences written so far (see :class:`CorpusHasher`)."""
        return self.meta["corpus_fingerprint"]

    def shard_fingerprints(self) -> list[tuple[int, str]]:
        """(end sequence index, corpus fingerprint after it) for each completed shard."""
        return [(s["seq_end"], s["corpus_fingerprint"]) for s in self.meta["shards"]]

    def write_shard(self, *, offsets: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, ce: np.ndarray,
                    seq_index: np.ndarray, doc_spans: np.ndarray, corpus_fingerprint: str) -> Path:
        """Write the next shard (sequences ``next_seq ..``), then ``meta.json``; returns its path."""
        k = int(self.meta["k"])
        tensors = {"offsets": offsets, "seq_index": seq_index, "doc_spans": doc_spans, "topk_ids": topk_ids,
                   "ce": ce, "topk_logprobs": topk_logprobs}
        tensors = {n: np.asarray(tensors[n]) for n in TENSOR_ORDER}
        for n, a in tensors.items():
            if a.dtype != _DTYPES[n]:
                raise TypeError(f"{n}: expected {np.dtype(_DTYPES[n])}, got {a.dtype}")
        n_seq = len(tensors["seq_index"])
        n_tok = int(tensors["offsets"][-1]) if len(tensors["offsets"]) else -1
        if n_seq == 0 or tensors["offsets"].shape != (n_seq + 1,) or tensors["offsets"][0] != 0 \
                or np.any(np.diff(tensors["offsets"]) < 0):
            raise ValueError("offsets: must be non-decreasing [n_seq + 1] from 0 with n_seq >= 1")
        if tensors["topk_ids"].shape != (n_tok, k) or tensors["topk_logprobs"].shape != (n_tok, k):
            raise ValueError(f"topk_ids/topk_logprobs: expected [{n_tok}, {k}], got "
                             f"{list(tensors['topk_ids'].shape)} / {list(tensors['topk_logprobs'].shape)}")
        if tensors["ce"].shape != (n_seq,) or tensors["doc_spans"].shape != (n_seq, 3):
            raise ValueError("ce / doc_spans: expected [n_seq] / [n_seq, 3]")
        first = self.next_seq
        if not np.array_equal(tensors["seq_index"], np.arange(first, first + n_seq)):
            raise ValueError(f"seq_index: expected {first}..{first + n_seq - 1}")
        md = {"format_version": str(FORMAT_VERSION), "source_name": str(self.meta["source_name"]),
              "tokenizer_fingerprint": self.meta["tokenizer_fingerprint"], "k": str(k),
              "vocab_size": str(self.meta["vocab_size"]), "first_seq": str(first), "last_seq": str(first + n_seq - 1)}
        chunks = serialize_safetensors(tensors, md)
        name = shard_name(self.next_shard)
        path = self.out_dir / name
        atomic_write(path, chunks)
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        self.meta["shards"].append({"file": name, "seq_start": first, "seq_end": first + n_seq, "num_tokens": n_tok,
                                    "bytes": sum(len(c) for c in chunks), "sha256": h.hexdigest(),
                                    "corpus_fingerprint": corpus_fingerprint})
        self.meta["num_sequences"] = first + n_seq - seq_base(self.meta)
        self.meta["complete"] = False
        self.meta["num_tokens"] = int(self.meta["num_tokens"]) + n_tok
        self.meta["corpus_fingerprint"] = corpus_fingerprint
        self._write_meta()
        return path

    def finish(self) -> None:
        """Mark the output complete (every sequence of the corpus written)."""
        self.meta["complete"] = True
        self._write_meta()

    def _write_meta(self) -> None:
        atomic_write(self.out_dir / META_NAME, [json_bytes(self.meta)])


class ShardReader:
    """Reads a shard directory back: ``len``, ``reader[seq_index]``, iteration, ``reader.ce``.

    Opening validates ``meta.json`` and that every listed shard exists with its recorded size;
    a shard's header, shapes, metadata and (unless ``check_sha256=False``) sha256 are checked the
    first time it is loaded; :meth:`verify` checks all of them now. Every problem is a
    ``ValueError`` naming the file.
    """

    def __init__(self, out_dir: str | os.PathLike, check_sha256: bool = True):
        self.out_dir = Path(out_dir)
        self.meta = load_meta(self.out_dir)
        self.k = int(self.meta["k"])
        self.check_sha256 = check_sha256
        self._shards = self.meta["shards"]
        base = seq_base(self.meta)      # a rank's part holds the global sequences base, base + 1, ...
        self._starts = [s["seq_start"] - base for s in self._shards]
        expect = base
        for s in self._shards:
            p = self.out_dir / s["file"]
            if s["seq_start"] != expect:
                raise ValueError(f"{self.out_dir / META_NAME}: shard {s['file']} starts at sequence {s['seq_start']}, "
                                 f"expected {expect}")
            expect = s["seq_end"]
            if not p.exists():
                raise ValueError(f"{p}: shard listed in meta.json is missing")
            if p.stat().st_size != s["bytes"]:
                raise ValueError(f"{p}: shard is {p.stat().st_size} bytes, meta.json says {s['bytes']} (truncated?)")
        if expect - base != self.meta["num_sequences"]:
            raise ValueError(f"{self.out_dir / META_NAME}: shards cover {expect - base} sequences, num_sequences says "
                             f"{self.meta['num_sequences']}")
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def __len__(self) -> int:
        return int(self.meta["num_sequences"])

    def shard(self, i: int) -> dict[str, np.ndarray]:
        """All tensors of shard ``i`` (validated; the last two loaded are cached)."""
        if i in self._cache:
            return self._cache[i]
        s = self._shards[i]
        path = self.out_dir / s["file"]
        t, md = read_safetensors(path, s["sha256"] if self.check_sha256 else None, _SHA_MISMATCH)
        self._validate(path, s, t, md)
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = t
        return t

    def _validate(self, path: Path, s: dict, t: dict, md: dict) -> None:
        missing = [n for n in TENSOR_ORDER if n not in t]
        if missing:
            raise ValueError(f"{path}: corrupted shard: missing tensors {missing}")
        for n in TENSOR_ORDER:
            if t[n].dtype != _DTYPES[n]:
                raise ValueError(f"{path}: corrupted shard: {n} has dtype {t[n].dtype}")
        n_seq = s["seq_end"] - s["seq_start"]
        off = t["offsets"]
        ok = (off.shape == (n_seq + 1,) and off[0] == 0 and off[-1] == s["num_tokens"]
              and not np.any(np.diff(off) < 0)
              and t["topk_ids"].shape == (s["num_tokens"], self.k) == t["topk_logprobs"].shape
              and t["ce"].shape == (n_seq,) and t["doc_spans"].shape == (n_seq, 3)
              and np.array_equal(t["seq_index"], np.arange(s["seq_start"], s["seq_end"])))
        if not ok:
            raise ValueError(f"{path}: corrupted shard: shapes or offsets disagree with meta.json")
        want = {"tokenizer_fingerprint": self.meta["tokenizer_fingerprint"], "k": str(self.k),
                "first_seq": str(s["seq_start"]), "last_seq": str(s["seq_end"] - 1)}
        bad = [k for k, v in want.items() if md.get(k) != v]
        if bad:
            raise ValueError(f"{path}: shard metadata {bad} disagree with meta.json")

    def verify(self) -> None:
        """Check every shard now (sha256, header, shapes); ``ValueError`` naming the first bad file."""
        for i, s in enumerate(self._shards):
            path = self.out_dir / s["file"]
            t, md = read_safetensors(path, s["sha256"], _SHA_MISMATCH)
            self._validate(path, s, t, md)

    def _locate(self, seq_index: int) -> tuple[int, int]:
        n = len(self)
        if not isinstance(seq_index, (int, np.integer)):
            raise TypeError(f"seq_index: expected int, got {type(seq_index).__name__}")
        if seq_index < 0:
            seq_index += n
        if not 0 <= seq_index < n:
            raise IndexError(f"seq_index {seq_index} out of range for {n} sequences")
        i = bisect.bisect_right(self._starts, seq_index) - 1
        return i, int(seq_index) - self._starts[i]

    def __getitem__(self, seq_index: int) -> dict[str, Any]:
        """One sequence: ``topk_ids`` int32 [n, k], ``topk_logprobs`` float16 [n, k], ``ce`` (float),
        ``seq_index`` (global: in a rank's part, ``reader[0]`` is sequence ``seq_start``), ``doc_index``,
        ``char_start``, ``char_end`` (ints)."""
        i, j = self._locate(seq_index)
        t = self.shard(i)
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        doc, c0, c1 = (int(x) for x in t["doc_spans"][j])
        return {"topk_ids": t["topk_ids"][a:b], "topk_logprobs": t["topk_logprobs"][a:b], "ce": float(t["ce"][j]),
                "seq_index": int(t["seq_index"][j]), "doc_index": doc, "char_start": c0, "char_end": c1}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def ce(self) -> np.ndarray:
        """Per-sequence CE of the source, float32 [len(self)] (NaN for sequences of < 2 tokens)."""
        if not self._shards:
            return np.zeros(0, np.float32)
        return np.concatenate([self.shard(i)["ce"] for i in range(len(self._shards))])

    def bytes_per_token(self) -> float:
        """Bytes on disk (shards + meta.json) per stored token."""
        total = sum(s["bytes"] for s in self._shards) + (self.out_dir / META_NAME).stat().st_size
        return total / max(self.num_tokens, 1)
