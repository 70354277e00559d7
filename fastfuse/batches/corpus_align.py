"""Alignment at corpus scale (``fastfuse align``): target tokenisation, per-source ``AlignMap``
rows and vocabulary maps for every sequence that the sources' top-k shards hold.

Pipeline (DESIGN.md §3)::

    chunks = split_corpus(texts, [target, *sources], block_size)      # every tokenizer fits
    extract_topk(source_model, source_tok, chunks, "run/sources/NAME")  # per source
    align_corpus(chunks, target_tok, {"NAME": (source_tok, "run/sources/NAME")}, "run/align")

Output directory::

    target/shard-*.safetensors   offsets int64 [n+1], input_ids int32 [tokens], seq_index int64 [n]
    NAME/shard-*.safetensors     offsets int64 [n+1] (target tokens), pos int32 [tokens]
    NAME/vocab.safetensors       VocabMap (source id -> target id), cached across runs
    meta.json                    sources, their shard directories, fingerprints, coverage

``pos[t]`` is the source position whose predicted token spans the same bytes as target token t+1
(next-token semantics), or -1. Written atomically; a finished run is skipped on the next call
and a run with other tokenizers or shards is refused with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fastfuse.align.spans import TokenizerOffsets
from fastfuse.batches.align_pool import align_chunks
from fastfuse.corpus import chain_fingerprint, iter_corpus
from fastfuse.teachers.rank_parts import PartsReader, open_shards
from fastfuse.teachers.shards import ShardReader, shard_name, tokenizer_fingerprint
from fastfuse.storage import atomic_write, json_bytes, read_safetensors, serialize_safetensors, sha256_file
from fastfuse.align.vocab_map import VocabMap

ALIGN_FORMAT_VERSION = 2     # 2: the corpus and every output file's sha256 are part of meta.json
RESERVED_NAMES = ("target",)                                   # directories of the output itself
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_source_name(name: Any) -> str:
    """A source name is a directory of the output: a short identifier, not a reserved name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"sources: name {name!r} must be 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it names a directory of the output)")
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"sources: name {name!r} is reserved (the output's own {name.lower()}/ directory)")
    return name


def corpus_fingerprint(docs: list[str]) -> str:
    """sha256 over the documents (length-prefixed UTF-8): part of the alignment's identity."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<q", len(b)))
        h.update(b)
    return h.hexdigest()


def _check_against_shards(name: str, seqs, reader: ShardReader | PartsReader, docs: list[str]) -> None:
    """``seqs``: (source length, doc index, pos) per sequence, as :class:`ChunkAligner` gives them.
    Also recomputes the corpus fingerprint chain (:func:`fastfuse.corpus.chain_fingerprint`) over
    the shards' own document spans of ``docs`` and compares it with the one every shard recorded --
    each part's shards of a distributed run too, so parts written from another corpus (or from
    several) are refused, naming the part, even where their token counts agree."""
    if len(reader) != len(seqs):
        raise ValueError(f"sources['{name}']: its shards hold {len(reader)} sequences but the corpus gives "
                         f"{len(seqs)}; extract and align the same (already split) corpus")
    recorded = {int(s["seq_end"]): (s["corpus_fingerprint"], s["file"]) for s in reader.meta["shards"]}
    h = hashlib.sha256(b"").digest()
    for i, (n, doc, _) in enumerate(seqs):
        rec = reader[i]
        if rec["doc_index"] != doc or len(rec["topk_ids"]) != n:
            raise ValueError(
                f"sources['{name}']: sequence {i} has {len(rec['topk_ids'])} positions from document "
                f"{rec['doc_index']} in the shards, but {n} tokens from document {doc} here: the corpus "
                "was split differently (split it once with fastfuse.align.chunking.split_corpus for all tokenizers)")
        h = chain_fingerprint(h, doc, int(rec["char_start"]), int(rec["char_end"]), docs[doc])
        want, where = recorded.get(i + 1, (None, None))
        if want is not None and want != h.hex():
            raise ValueError(f"sources['{name}']: {Path(reader.out_dir) / where} was extracted from another corpus "
                             f"than the one aligned here (its sequences up to {i + 1} hash differently); "
                             "extract every part from this corpus")


def _coverage(pos_rows, reader: ShardReader | PartsReader, vocab: np.ndarray) -> dict[str, float]:
    positions = aligned = fallback = 0
    mass = 0.0
    for i, pos in enumerate(pos_rows):
        p = pos[:-1]
        positions += len(p)
        ok = p >= 0
        aligned += int(ok.sum())
        if not ok.any():
            fallback += len(p)
            continue
        rec = reader[i]
        ids = rec["topk_ids"][p[ok]]
        prob = np.exp(rec["topk_logprobs"][p[ok]].astype(np.float64))
        mapped = (ids >= 0) & (vocab[np.clip(ids, 0, len(vocab) - 1)] >= 0)
        mass += float(((prob * mapped).sum(1) / np.maximum(prob.sum(1), 1e-30)).sum())
        fallback += len(p) - int(ok.sum()) + int((~mapped.any(1)).sum())
    n = max(positions, 1)
    return {"positions": positions, "aligned_1to1": aligned / n, "one_hot_fallback": fallback / n,
            "vocab_mapped_mass": mass / max(aligned, 1)}


def _write_shards(out: Path, arrays_per_seq: list[dict[str, np.ndarray]], offsets_key: str, shard_size: int,
                  metadata: dict[str, str]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, max(len(arrays_per_seq), 1), shard_size)):
        part = arrays_per_seq[start:start + shard_size]
        lens = [len(a[offsets_key]) for a in part]
        tensors = {"offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                   "seq_index": np.arange(start, start + len(part), dtype=np.int64)}
        for key in part[0] if part else []:
            tensors[key] = np.concatenate([a[key] for a in part]).astype(part[0][key].dtype)
        atomic_write(out / shard_name(k), serialize_safetensors(tensors, metadata))
        names.append(shard_name(k))
    return names


def _align_meta_problem(meta: Any) -> str | None:
    """What is wrong with a parsed align meta.json, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    if meta.get("format_version") != ALIGN_FORMAT_VERSION:
        return (f"format_version {meta.get('format_version')!r}: written by another fastfuse version "
                f"(this one reads {ALIGN_FORMAT_VERSION}); re-run fastfuse align")
    if not meta.get("complete"):
        return "the alignment run did not finish"
    if not isinstance(meta.get("sources"), dict) or not all(isinstance(v, dict) and isinstance(v.get("dir"), str)
                                                            and isinstance(v.get("shards"), list)
                                                            for v in meta["sources"].values()):
        return "sources must map each name to an object with 'dir' and 'shards'"
    bad = [name for name in meta["sources"] if not (isinstance(name, str) and _NAME.fullmatch(name))
           or name.lower() in RESERVED_NAMES]
    if bad:
        return f"source names {bad} are not valid directory names"
    n = meta.get("num_sequences")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_sequences must be a positive integer, got {n!r}"
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            and ".." not in Path(k).parts and not Path(k).is_absolute() for k, r in files.items()):
        return "files must map relative paths to {bytes, sha256}"
    return None


def file_digests(root: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{path relative to root: {"bytes", "sha256"}} of files just written."""
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def align_corpus(texts: Any, target_tokenizer, sources: Mapping[str, tuple[Any, str | os.PathLike]],
                 out_dir: str | os.PathLike, vocab_mode: str = "exact", seq_mode: str = "offsets", shard_size: int = 4096,
                 num_threads: int = 0, progress: bool = True, workers: int = 1) -> dict:
    """Align every source's extracted sequences to the target tokenisation; returns the coverage.

    Args:
        texts: the same corpus the sources were extracted from (already split so that every
            tokenizer fits its block size): str iterable, files or a dataset (as ``extract_topk``).
        target_tokenizer: the target's Hugging Face fast tokenizer.
        sources: ``{name: (source tokenizer, directory of its top-k shards)}``.
        vocab_mode: ``"exact"`` or ``"mined"`` (see :class:`~fastfuse.align.vocab_map.VocabMap`).
        seq_mode: ``"offsets"`` (exact byte spans, default) or ``"mined"`` (FuseLLM's DTW over token
            strings, 1-to-1 mappings of equal tokens only).
        workers: processes that tokenise and align chunks of documents (:mod:`fastfuse.batches.align_pool`);
            the output is the same for any number.
    """
    if seq_mode not in ("offsets", "mined"):
        raise ValueError(f"seq_mode: expected 'offsets' or 'mined', got {seq_mode!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    from tqdm import tqdm

    out = Path(out_dir)
    for name in sources:
        check_source_name(name)
    docs = list(iter_corpus(texts))
    if not any(d.strip() for d in docs):
        raise ValueError("texts: the corpus is empty")
    tgt_fp = tokenizer_fingerprint(target_tokenizer)
    identity: dict[str, Any] = {"format_version": ALIGN_FORMAT_VERSION, "target_tokenizer_fingerprint": tgt_fp,
                "corpus_fingerprint": corpus_fingerprint(docs), "vocab_mode": vocab_mode, "seq_mode": seq_mode,
                "sources": {}}
    for name, (tok, shard_dir) in sources.items():
        smeta = open_shards(shard_dir).meta      # one directory, or the parts of a distributed run
        if smeta["tokenizer_fingerprint"] != tokenizer_fingerprint(tok):
            raise ValueError(f"sources['{name}']: the tokenizer given is not the one {shard_dir} was extracted with")
        identity["sources"][name] = {"dir": os.path.relpath(os.path.abspath(shard_dir), os.path.abspath(out)),
                                     "tokenizer_fingerprint": smeta["tokenizer_fingerprint"],
                                     "shards": [s["sha256"] for s in smeta["shards"]],
                                     "vocab_size": int(smeta["vocab_size"])}
    meta_path = out / "meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text("utf-8"))
        except (OSError, ValueError):
            old = None          # unreadable: redo the run, which rewrites it
        if isinstance(old, dict) and old.get("complete") and {k: old.get(k) for k in identity} == identity:
            return old["coverage"]

    readers = {name: open_shards(shard_dir) for name, (_, shard_dir) in sources.items()}
    tgt_seqs: list = []
    src_seqs: dict[str, list] = {name: [] for name in sources}
    with tqdm(total=len(docs), desc="align", unit="doc", disable=not progress, dynamic_ncols=True) as bar:
        for r in align_chunks(docs, target_tokenizer, {n: t for n, (t, _) in sources.items()}, seq_mode,
                              num_threads, workers, on_chunk=bar.update):
            tgt_seqs += r["target"]
            for name, rows in r["sources"].items():
                src_seqs[name] += rows
    if not tgt_seqs:
        raise ValueError("texts: the corpus is empty (no document has a target token)")
    written: list[Path] = []
    written += [out / "target" / n for n in _write_shards(
        out / "target", [{"input_ids": ids} for ids, _ in tgt_seqs], "input_ids", shard_size,
        {"kind": "fastfuse.target", "tokenizer_fingerprint": tgt_fp})]
    coverage = {}
    for name, (tok, _) in sources.items():
        reader = readers[name]
        _check_against_shards(name, src_seqs[name], reader, docs)
        positions = [p for _, _, p in src_seqs[name]]
        vpath = out / name / "vocab.safetensors"
        vmap = VocabMap.build(tok, target_tokenizer, mode=vocab_mode, num_threads=num_threads)
        (out / name).mkdir(parents=True, exist_ok=True)
        vmap.save(vpath)
        written += [vpath] + [out / name / n for n in _write_shards(
            out / name, [{"pos": p.astype(np.int32)} for p in positions], "pos", shard_size,
            {"kind": "fastfuse.align.spans", "source": name})]
        coverage[name] = _coverage(positions, reader, vmap.ids) | {"vocab_exact_rate": vmap.exact_rate}
    meta = identity | {"complete": True, "num_sequences": len(tgt_seqs), "coverage": coverage,
                       "target_vocab": len(TokenizerOffsets(target_tokenizer).surfaces),
                       "files": file_digests(out, written)}
    atomic_write(meta_path, [json_bytes(meta)])
    return coverage


class AlignedStore:
    """Reads an ``align_corpus`` output directory: target ids and per-source ``pos`` per sequence.

    Opening checks ``meta.json``'s shape and that every file it lists exists with its recorded size,
    and reads the target and ``pos`` shards whole, checking each one's sha256 as it is read (so an
    edited or swapped file is refused, never silently used); vocabulary maps are checked when loaded.
    Every problem is a ``ValueError`` naming the file.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        path = self.dir / "meta.json"
        try:
            self.meta = json.loads(path.read_text("utf-8"))
        except FileNotFoundError as e:
            raise ValueError(f"{path}: not found (run fastfuse align first)") from e
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from e
        problem = _align_meta_problem(self.meta)
        if problem:
            raise ValueError(f"{path}: {problem}")
        for rel, rec in self.meta["files"].items():
            f = self.dir / rel
            if not f.is_file() or f.stat().st_size != rec["bytes"]:
                raise ValueError(f"{f}: missing or of another size than {path} records (re-run fastfuse align)")
        self.sources = list(self.meta["sources"])
        self._target = self._load("target", "input_ids")
        self._pos = {s: self._load(s, "pos") for s in self.sources}

    def _mismatch(self) -> str:
        return f"sha256 differs from {self.dir / 'meta.json'} (edited or replaced after align)"

    def _checked(self, rel: str) -> Path:
        """A file read by another library (the vocab map): hashed first, then read."""
        f = self.dir / rel
        if sha256_file(f) != self.meta["files"][rel]["sha256"]:
            raise ValueError(f"{f}: {self._mismatch()}")
        return f

    def _load(self, sub: str, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
        rels = sorted(r for r in self.meta["files"] if r.startswith(f"{sub}/shard-"))
        if not rels:
            raise ValueError(f"{self.dir / sub}: no shards listed in meta.json")
        out = []
        for rel in rels:
            p = self.dir / rel
            t, _ = read_safetensors(p, self.meta["files"][rel]["sha256"], self._mismatch())
            if key not in t or "offsets" not in t or t["offsets"][-1] != len(t[key]):
                raise ValueError(f"{p}: not a fastfuse alignment shard (missing or inconsistent '{key}')")
            out.append((t["offsets"], t[key]))
        if sum(len(o) - 1 for o, _ in out) != self.meta["num_sequences"]:
            raise ValueError(f"{self.dir / sub}: shards hold another number of sequences than meta.json says")
        return out

    def __len__(self) -> int:
        return int(self.meta["num_sequences"])

    @staticmethod
    def _get(parts, i: int) -> np.ndarray:
        for off, data in parts:
            n = len(off) - 1
            if i < n:
                return data[off[i]:off[i + 1]]
            i -= n
        raise IndexError(i)

    def target_ids(self, i: int) -> np.ndarray:
        return self._get(self._target, i)

    def pos(self, source: str, i: int) -> np.ndarray:
        return self._get(self._pos[source], i)

    def vocab_map(self, source: str) -> VocabMap:
        return VocabMap.load(self._checked(f"{source}/vocab.safetensors"))

    def source_dir(self, source: str) -> Path:
        return (self.dir / self.meta["sources"][source]["dir"]).resolve()

    def source_shards(self, source: str) -> list[str]:
        """The sha256 of each of the source's top-k shards that this alignment was built from."""
        return list(self.meta["sources"][source]["shards"])
