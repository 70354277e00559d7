"""Real tokenizers without hub access, from the vocabulary-only GGUF files that a PyPI package ships.

The source distribution of ``llama-cpp-python==0.3.36`` carries llama.cpp's test vocabularies
(``vendor/llama.cpp/models/ggml-vocab-*.gguf``) and, for most of them, ``.inp``/``.out`` files with
expected tokenisations. :func:`ensure_vocab_files` downloads that sdist once from the package index
that pip uses, checks its sha256, and extracts only those files into a cache directory
(``$FASTFUSE_CACHE`` or ``~/.cache/fastfuse``). :func:`load_tokenizer` turns a GGUF file into a
Hugging Face fast tokenizer (through ``transformers``' GGUF support, or built from the GGUF fields
with ``tokenizers`` for families transformers cannot read) and caches the converted
``tokenizer.json`` so later loads take well under a second.
"""
from __future__ import annotations

import hashlib
import html.parser
import os
import re
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBER_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"

# name -> (model family as Hugging Face knows it, whether transformers' GGUF loader handles it)
TOKENIZERS = {
    "llama-spm": "Llama-2 SentencePiece BPE with byte fallback, 32000",
    "llama-bpe": "Llama-3 byte-level BPE, 128256",
    "qwen2": "Qwen2 byte-level BPE, 151643 + specials",
    "phi-3": "Phi-3 SentencePiece, 32064",
    "gpt-2": "GPT-2 byte-level BPE, 50257",
    "mpt": "MPT (GPT-NeoX) byte-level BPE, 50432",
    "gpt-neox": "GPT-NeoX-20B byte-level BPE, 50432",
    "falcon": "Falcon byte-level BPE, 65024",
    "starcoder": "StarCoder byte-level BPE, 49152",
}
# Families transformers' GGUF reader does not convert: built from the GGUF fields instead.
_BUILT_FROM_FIELDS = {"mpt", "gpt-neox"}
_VOCAB_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


def cache_dir() -> Path:
    """The directory where the vocabulary files and converted tokenizers are kept."""
    root = os.environ.get("FASTFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastfuse")
    return Path(root)


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)


def _index_urls() -> list[str]:
    """The package indexes pip is configured with (PEP 503 simple API), PyPI last."""
    urls = []
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        urls += [u for u in os.environ.get(var, "").split() if u.startswith("http")]
    urls.append("https://pypi.org/simple")
    return list(dict.fromkeys(urls))


def _download_bar(url: str, size: int):
    """Progress on stderr from the first second: the only time fastfuse needs the network."""
    import sys

    from tqdm import tqdm

    print(f"fastfuse: {url}", file=sys.stderr, flush=True)
    return tqdm(total=size or None, unit="B", unit_scale=True, desc=SDIST_FILE, file=sys.stderr, mininterval=1.0)


def _download_sdist(dest: Path) -> None:
    """Fetch the sdist through the simple index (no build step, unlike ``pip download``)."""
    errors = []
    for index in _index_urls():
        page = f"{index.rstrip('/')}/{SDIST_NAME}/"
        try:
            with urllib.request.urlopen(page, timeout=60) as r:
                parser = _LinkParser()
                parser.feed(r.read().decode("utf-8", "replace"))
            link = next(u for u in parser.links if urllib.parse.urlsplit(u).path.endswith("/" + SDIST_FILE))
            url = urllib.parse.urljoin(page, link.split("#")[0])
            tmp = dest.with_name(dest.name + f".part{os.getpid()}")
            with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f, \
                    _download_bar(url, int(r.headers.get("Content-Length") or 0)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            os.replace(tmp, dest)
            return
        except Exception as e:  # try the next index
            errors.append(f"{page}: {e!r}")
    raise RuntimeError(f"could not download {SDIST_FILE}: " + "; ".join(errors))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ensure_vocab_files() -> Path:
    """Return the directory holding the ``ggml-vocab-*`` files, downloading them once."""
    out = cache_dir() / f"llama-cpp-vocab-{SDIST_VERSION}"
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    sdist = out.parent / SDIST_FILE
    if not sdist.exists() or _sha256(sdist) != SDIST_SHA256:
        import sys

        print(f"fastfuse: first use of the real tokenizers: downloading their vocabulary files once ({SDIST_FILE}, "
              f"76 MB, sha256-checked) from the package index pip uses, into {out.parent}; later runs are offline",
              file=sys.stderr, flush=True)
        _download_sdist(sdist)
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink(missing_ok=True)
        raise RuntimeError(f"{SDIST_FILE}: sha256 {digest} does not match the expected {SDIST_SHA256}")
    # Extract into a temporary directory and rename, so a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".extract-"))
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() and m.name.startswith(_MEMBER_PREFIX + "ggml-vocab-") else None
            if f is not None:
                (tmp / m.name[len(_MEMBER_PREFIX):]).write_bytes(f.read())
    (tmp / ".complete").write_text(SDIST_SHA256)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_path(name: str) -> Path:
    if name not in TOKENIZERS:
        raise ValueError(f"name: unknown tokenizer {name!r}; expected one of {sorted(TOKENIZERS)}")
    return ensure_vocab_files() / f"ggml-vocab-{name}.gguf"


def _build_byte_level_bpe_from_fields(path: Path):
    """GPT-NeoX-style byte-level BPE straight from the GGUF fields (transformers can't read these)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    reader = GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # GGUF token types: 3 = control, 4 = user-defined (added tokens).
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    eos = tokens[int(reader.fields["tokenizer.ggml.eos_token_id"].contents())]
    return tok, {"bos_token": eos, "eos_token": eos, "unk_token": eos}


def _fix_sentencepiece_dummy_prefix(tok) -> None:
    """SentencePiece always prepends "▁" (add_dummy_prefix). transformers' GGUF converter expresses that
    with a Metaspace pre-tokenizer, which skips the prefix when the text already starts with a space
    (" Hello" -> [▁Hello] instead of SentencePiece's [▁, ▁Hello]). Use the normaliser form of the
    original Llama tokenizer.json instead, which matches llama.cpp's expected tokenisations."""
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    pre = backend.pre_tokenizer
    if backend.normalizer is None and pre is not None and type(pre).__name__ == "Metaspace":
        rep = pre.replacement
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(rep), normalizers.Replace(" ", rep)])
        backend.pre_tokenizer = None


def _fix_llama3_ignore_merges(tok, path: Path) -> None:
    """Llama-3's BPE takes a whole pre-token straight from the vocabulary when it is there
    (``ignore_merges`` in its tokenizer.json); the GGUF converter drops that flag."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() == "llama-bpe":
        tok.backend_tokenizer.model.ignore_merges = True


def load_tokenizer(name: str):
    """A Hugging Face fast tokenizer for one of :data:`TOKENIZERS`, offline after the first call."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    path = gguf_path(name)
    converted = cache_dir() / "tokenizers" / name
    if (converted / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(converted))
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if name in _BUILT_FROM_FIELDS:
        backend, specials = _build_byte_level_bpe_from_fields(path)
        tok: PreTrainedTokenizerBase = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    else:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _fix_sentencepiece_dummy_prefix(tok)
        _fix_llama3_ignore_merges(tok, path)
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=f".{name}-"))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, converted)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(converted))


def load_any_tokenizer(name_or_path: str):
    """A tokenizer by :data:`TOKENIZERS` name (:func:`load_tokenizer`), else from a local
    ``tokenizer.json`` file or a local tokenizer/model directory (never from a hub)."""
    if name_or_path in TOKENIZERS:
        return load_tokenizer(name_or_path)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if not p.exists():
        raise ValueError(f"name_or_path: {name_or_path!r} is neither a known tokenizer name "
                         f"({', '.join(TOKENIZERS)}) nor a local path")
    return AutoTokenizer.from_pretrained(str(p))


@dataclass
class VocabTestCase:
    text: str
    ids: list[int]


def vocab_test_cases(name: str) -> list[VocabTestCase]:
    """llama.cpp's expected tokenisations for ``name`` (texts without BOS), or [] if none ship."""
    p = gguf_path(name)
    inp, out = p.with_name(p.name + ".inp"), p.with_name(p.name + ".out")
    if not inp.exists() or not out.exists():
        return []
    texts = inp.read_text(encoding="utf-8").split(_VOCAB_TEST_SEPARATOR)
    lines = out.read_text(encoding="utf-8").split("\n")
    # The .inp file ends with a separator line; .out has one line per text.
    if texts and texts[-1].rstrip("\n") in ("", "__ggml_vocab_test__"):
        texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__").removesuffix("__ggml_vocab_test__")
    cases = []
    for text, line in zip(texts, lines):
        cases.append(VocabTestCase(text, [int(x) for x in re.findall(r"-?\d+", line)]))
    return cases
