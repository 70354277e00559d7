"""Token surface forms: the bytes each token id of a tokenizer stands for.

The rule is read from the tokenizer's own decoder (``backend_tokenizer``'s JSON), never from its
class name:

- ``ByteLevel`` decoders (GPT-2, Llama-3, Qwen2, MPT, ...): every character maps back to one byte
  through GPT-2's byte table (``Ġ`` -> space, ``Ċ`` -> newline).
- ``Replace`` steps (SentencePiece's ``▁`` -> space) are applied in order; ``Metaspace`` likewise.
- ``ByteFallback``: tokens spelled ``<0xNN>`` are that one byte.
- ``WordPiece``: continuation tokens lose their prefix (``##``); the space between words belongs to
  no token, so WordPiece surfaces do not concatenate back to the text.
- Sequence-level steps (``Fuse``, ``Strip``: SentencePiece's removal of the dummy-prefix space) do not
  change single tokens and are ignored: a SentencePiece token ``▁Hello`` is `` Hello``.
- Added tokens are their content string in UTF-8 (they bypass the model's decoder); special ones are
  flagged in :attr:`TokenSurfaces.special`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass
class TokenSurfaces:
    """``bytes[i]`` is what token id ``i`` stands for; ``special[i]`` marks control/special tokens;
    ``missing[i]`` marks ids no token has (vocabularies with id gaps; their bytes are empty)."""

    bytes: list[bytes]
    special: np.ndarray  # bool [V]
    # bool [V]; None (no gaps) may be given and becomes all False, so readers always see an array
    missing: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.missing is None:
            self.missing = np.zeros(len(self.bytes), dtype=bool)

    def __len__(self) -> int:
        return len(self.bytes)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(b) for b in self.bytes), dtype=np.int64, count=len(self.bytes))


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder["decoders"] for s in _decoder_steps(d)]
    return [decoder]


class SurfaceRule:
    """The per-token decoding rule of one tokenizer, derived from its decoder config."""

    def __init__(self, decoder: dict | None):
        self.steps = _decoder_steps(decoder)
        kinds = {s.get("type") for s in self.steps}
        unknown = kinds - {"ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace", "WordPiece", None}
        if unknown:
            raise ValueError(f"tokenizer: unsupported decoder step(s) {sorted(map(str, unknown))} for token surface forms")
        self.byte_level = "ByteLevel" in kinds

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SurfaceRule":
        decoder = backend_tokenizer(tokenizer).decoder
        # The decoder's own state is its JSON config: cheaper than serialising the whole tokenizer.
        return cls(None if decoder is None else json.loads(decoder.__getstate__()))

    def replace_chars(self, s: str) -> str:
        """The string-level replacements (``▁`` -> space); used for tokens and normalised text alike."""
        for st in self.steps:
            t = st.get("type")
            if t == "Replace":
                pat = st["pattern"]
                if "String" not in pat:
                    raise ValueError("tokenizer: Replace decoders with a regex pattern are not supported")
                s = s.replace(pat["String"], st["content"])
            elif t == "Metaspace":
                s = s.replace(st.get("replacement", "▁"), " ")
        return s

    def token_bytes(self, token: str) -> bytes:
        if self.byte_level:
            table = gpt2_unicode_to_byte()
            # Characters outside the table (rare, hand-added tokens) keep their UTF-8 bytes.
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in token)
        for st in self.steps:
            t = st.get("type")
            if t == "ByteFallback":
                m = _BYTE_FALLBACK.match(token)
                if m:
                    return bytes([int(m.group(1), 16)])
            elif t == "WordPiece":
                prefix = st.get("prefix", "##")
                if token.startswith(prefix):
                    token = token[len(prefix):]
        return self.replace_chars(token).encode("utf-8")


def backend_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer (or the bare one itself);
    TypeError for anything else (slow tokenizers have no decoder config or offsets)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        if type(tokenizer).__name__ == "Tokenizer" and hasattr(tokenizer, "to_str"):
            return tokenizer  # a bare `tokenizers.Tokenizer`
        raise TypeError(
            f"tokenizer: expected a Hugging Face fast tokenizer (PreTrainedTokenizerFast or tokenizers.Tokenizer), "
            f"got {type(tokenizer).__name__}; slow tokenizers have no decoder config or offsets"
        )
    return backend


def token_surfaces(tokenizer) -> TokenSurfaces:
    """Bytes of every token id, added tokens included: ``max id + 1`` entries, which is
    ``len(tokenizer)`` unless the ids have gaps (``get_vocab_size`` counts tokens, not ids)."""
    backend = backend_tokenizer(tokenizer)
    rule = SurfaceRule.from_tokenizer(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=False)
    added_tokens = backend.get_added_tokens_decoder()
    size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1,
               max(added_tokens, default=-1) + 1)
    out: list[bytes] = [b""] * size
    missing = np.ones(size, dtype=bool)
    for tok, i in vocab.items():
        out[i] = rule.token_bytes(tok)
        missing[i] = False
    special = np.zeros(size, dtype=bool)
    for i, added in added_tokens.items():
        out[i] = added.content.encode("utf-8")
        special[i] = bool(added.special)
        missing[i] = False
    return TokenSurfaces(out, special, missing)


def normalized_text(tokenizer, text: str) -> bytes:
    """The text as the tokenizer's tokens spell it: its normaliser applied (e.g. SentencePiece's dummy
    prefix space, NFC), then the same character replacements as the tokens. Concatenating the surface
    bytes of ``encode(text)`` (special tokens excluded) gives exactly this for BPE/SentencePiece tokenizers."""
    backend = backend_tokenizer(tokenizer)
    rule = SurfaceRule.from_tokenizer(tokenizer)
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return rule.replace_chars(text).encode("utf-8")
