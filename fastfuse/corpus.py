"""Reading a corpus and cutting it into the sequences a tokenizer reads (DESIGN.md §3).

Used by extraction, alignment, the command line and the demo alike; torch-free.

1. **Corpus** (:func:`iter_corpus`): an iterable of ``str`` (one document each), a path or list of
   paths (``.jsonl`` -> the ``"text"`` field of every line; any other file -> one document), or a
   ``datasets.Dataset``-like object with a ``"text"`` column.
2. **Sequences** (:func:`source_sequences`): each document is tokenised once, without special
   tokens, with character offsets. A document whose tokenisation plus the tokenizer's own special
   tokens (e.g. Llama's BOS) fits ``block_size`` is one sequence. A longer one is cut into chunks of
   at most ``block_size - n_special`` tokens of *that* tokenisation (token ids are sliced, never
   re-tokenised, never decoded): each cut goes at the latest token boundary within the limit where
   the next token starts at or after the end of the previous one (so no character is split between
   chunks; only if there is no such boundary is the cut made at the limit). The chunk's text span
   is ``[end of the previous chunk's last token, end of its own last token)``, the first starting at
   0 and the last ending at ``len(document)``, so the spans tile the document and concatenate back
   to it. Each chunk then gets the tokenizer's special prefix/suffix tokens. Sequences are numbered
   in document order, then chunk order; documents with no tokens yield no sequence. Consumers that
   need the source's token ids call :func:`source_sequences` with the same tokenizer and block size.
3. **Fingerprint** (:func:`chain_fingerprint`): a sha256 chain over the sequences' text spans, which
   resumable writers store to check that a resumed run reads the same corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["iter_corpus", "check_text", "SourceSequence", "special_tokens", "split_points", "source_sequences",
           "chain_fingerprint", "pad_token_id", "python_docs", "python_code", "cut_text"]


def python_docs(max_docs: int | None = None) -> list[str]:
    """The English documentation pages that ship with Python (``pydoc_data.topics``), in sorted
    topic order: the real text the tests, benchmarks and demos use without any download."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return texts[:max_docs] if max_docs else texts


def cut_text(text: str, doc_chars: int, code: bool = False) -> list[str]:
    """``text`` cut into pieces of about ``doc_chars`` characters that concatenate back to it. A piece ends
    at the first boundary once it holds ``doc_chars`` characters: a non-blank line after a blank one
    (a paragraph), and for ``code`` only one that starts at column 0 (a top-level statement), so
    definitions stay whole where the text allows."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    piece: list[str] = []
    n = 0
    for i, line in enumerate(lines):
        if n >= doc_chars and line.strip() and i and not lines[i - 1].strip() and not (code and line[0].isspace()):
            out.append("".join(piece))
            piece, n = [], 0
        piece.append(line)
        n += len(line)
    if piece:
        out.append("".join(piece))
    return out


def python_code(max_docs: int | None = None, doc_chars: int = 4000) -> list[str]:
    """Python code that ships with Python: the standard library's top-level modules (``Lib/*.py``, sorted
    by name), each cut into documents of about ``doc_chars`` characters by :func:`cut_text`."""
    import sysconfig

    out: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out += [d for d in cut_text(text, doc_chars, code=True) if d.strip()]
        if max_docs and len(out) >= max_docs:
            return out[:max_docs]
    return out


def pad_token_id(tokenizer, default: int = 0) -> int:
    """The tokenizer's pad id, else ``default``: what padded batches use where no token is read."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else default


def check_text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode (encodable as UTF-8), else ``ValueError`` naming ``where`` and
    the character: a lone surrogate (``"\\ud800"`` in JSON) would otherwise fail deep in a tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid Unicode text: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}") from None
    return text


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield from _read_file(path, text_field)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start} "
                         "of the part read)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".ndjson"):
        with open(path, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_field!r} string ({e!r})") from e
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: field {text_field!r} is not a string")
                yield check_text(text, f"{path}:{n}")
    else:
        yield check_text(path.read_text(encoding="utf-8"), str(path))


def iter_corpus(texts: Any, text_field: str = "text") -> Iterator[str]:
    """Documents of a corpus, in order (see the module docstring for what ``texts`` may be)."""
    if isinstance(texts, str):
        raise TypeError("texts: a bare str is ambiguous; pass [text] for one document or pathlib.Path(...) for a file")
    if isinstance(texts, os.PathLike):
        yield from _iter_file(Path(texts), text_field)
        return
    if hasattr(texts, "column_names") and not isinstance(texts, (list, tuple)):  # datasets.(Iterable)Dataset
        cols = texts.column_names
        if cols is not None and text_field not in cols:
            raise ValueError(f"texts: dataset has no {text_field!r} column (columns: {cols})")
        for i, row in enumerate(texts):
            if not isinstance(row[text_field], str):
                raise TypeError(f"texts[{i}][{text_field!r}]: expected str, got {type(row[text_field]).__name__}")
            yield check_text(row[text_field], f"texts[{i}][{text_field!r}]")
        return
    for i, t in enumerate(texts):
        if isinstance(t, os.PathLike):
            yield from _iter_file(Path(t), text_field)
        elif isinstance(t, str):
            yield check_text(t, f"texts[{i}]")
        else:
            raise TypeError(f"texts[{i}]: expected str or os.PathLike, got {type(t).__name__}")


@dataclass
class SourceSequence:
    """One sequence the source reads: ``input_ids`` (int64 [n]) tokenised from
    ``document[char_start:char_end]`` of document ``doc_index``; ``offsets`` (int64 [n, 2]) are the
    character spans of its tokens in the document ((0, 0) for special tokens)."""

    seq_index: int
    doc_index: int
    char_start: int
    char_end: int
    input_ids: np.ndarray
    offsets: np.ndarray


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around a text with ``add_special_tokens=True``."""
    probe = "a b"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    raise ValueError("tokenizer: cannot locate the text tokens among the special tokens it adds")


def split_points(offsets: np.ndarray, cap: int) -> list[int]:
    """Token indices where a document of ``len(offsets)`` tokens is cut into chunks of <= ``cap``
    tokens (see the module docstring): returns ``[0, c1, ..., n]``."""
    n = len(offsets)
    cuts = [0]
    if n <= cap:
        return cuts + [n]
    # a cut before token j is clean when token j starts at or after the end of token j-1
    ok = np.nonzero(offsets[1:, 0] >= offsets[:-1, 1])[0] + 1
    start = 0
    while n - start > cap:
        lim = start + cap
        i = np.searchsorted(ok, lim, side="right") - 1
        j = int(ok[i]) if i >= 0 and ok[i] > start else lim
        cuts.append(j)
        start = j
    return cuts + [n]


def source_sequences(tokenizer, texts: Any, block_size: int, text_field: str = "text",
                     docs_per_batch: int = 64) -> Iterator[tuple[SourceSequence, str]]:
    """Yields ``(SourceSequence, document)`` for a corpus, deterministically (module docstring)."""
    prefix, suffix = special_tokens(tokenizer)
    cap = block_size - len(prefix) - len(suffix)
    if cap < 1:
        raise ValueError(f"block_size: {block_size} leaves no room next to {len(prefix) + len(suffix)} special tokens")
    pre = np.asarray(prefix, np.int64)
    suf = np.asarray(suffix, np.int64)
    pre_off = np.zeros((len(prefix), 2), np.int64)
    suf_off = np.zeros((len(suffix), 2), np.int64)
    seq = 0
    doc_index = 0

    def flush(docs: list[str]):
        enc = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for text, ids, offs in zip(docs, enc["input_ids"], enc["offset_mapping"]):
            yield text, np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2)

    pending: list[str] = []
    docs_iter = iter_corpus(texts, text_field)
    while True:
        pending = []
        for t in docs_iter:
            pending.append(t)
            if len(pending) >= docs_per_batch:
                break
        if not pending:
            return
        for text, ids, offs in flush(pending):
            if len(ids):
                cuts = split_points(offs, cap)
                for c, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                    c0 = 0 if c == 0 else int(offs[a - 1, 1])
                    c1 = len(text) if b == len(ids) else int(offs[b - 1, 1])
                    s = SourceSequence(seq, doc_index, c0, c1, np.concatenate([pre, ids[a:b], suf]),
                                       np.concatenate([pre_off, offs[a:b], suf_off]))
                    yield s, text
                    seq += 1
            doc_index += 1


def chain_fingerprint(h: bytes, doc_index: int, char_start: int, char_end: int, text: str) -> bytes:
    """One link of the corpus fingerprint: sha256(previous || doc, start, end || chunk text), for the
    sequence ``text[char_start:char_end]`` of document ``doc_index``."""
    m = hashlib.sha256(h)
    m.update(struct.pack("<qqq", doc_index, char_start, char_end))
    m.update(text[char_start:char_end].encode("utf-8", "surrogatepass"))
    return m.digest()
