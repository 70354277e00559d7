"""Token strings a completion server returns, mapped back to the source tokenizer's ids, exactly.

OpenAI-compatible servers name the tokens of ``logprobs`` by strings. Three spellings are read:

- ``"token_id:123"`` (vLLM's ``--return-tokens-as-token-ids``): the id itself, range-checked.
- ``"bytes:\\xe2\\x80"`` (OpenAI's spelling of a token that is not valid UTF-8 on its own): the bytes.
- any other string: the token's text, i.e. its surface bytes (:func:`fastfuse.align.surface.token_surfaces`:
  byte-level BPE ``Ġ`` -> space, SentencePiece ``▁`` -> space, ``<0xNN>`` -> that byte) decoded as UTF-8.

A text names one id when exactly one token has those bytes. One collision is resolved by rule: a
SentencePiece byte-fallback token (``<0x61>``) and a regular token with the same bytes (``a``) are
read as the regular token, because SentencePiece only emits byte tokens for bytes its vocabulary
cannot spell, so a model puts next to no mass on such twins. Every other string that names no id
(a lossy rendering such as ``"\\ufffd"`` for part of a UTF-8 character) or several ids is refused
with a ``ValueError`` that says so and points at token ids.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from fastfuse.align.surface import backend_tokenizer, token_surfaces

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_HEX = re.compile(r"\\x([0-9A-Fa-f]{2})")
ID_PREFIX = "token_id:"
BYTES_PREFIX = "bytes:"


class TokenStrings:
    """Maps a server's token strings to ids of ``tokenizer`` (module docstring); built once per run."""

    def __init__(self, tokenizer: Any) -> None:
        surf = token_surfaces(tokenizer)
        self.size = len(tokenizer)
        self.surfaces = surf.bytes
        self.special = surf.special
        pieces = backend_tokenizer(tokenizer).get_vocab(with_added_tokens=False)
        self.byte_fallback = np.zeros(len(surf), dtype=bool)
        for piece, i in pieces.items():
            if _BYTE_TOKEN.match(piece):
                self.byte_fallback[i] = True
        by_bytes: dict[bytes, list[int]] = defaultdict(list)
        for i in range(min(self.size, len(surf))):
            if not surf.missing[i]:
                by_bytes[surf.bytes[i]].append(i)
        self.by_bytes = dict(by_bytes)

    def _resolve(self, ids: list[int]) -> list[int]:
        regular = [i for i in ids if not self.byte_fallback[i]]
        return regular if regular and len(regular) < len(ids) else ids

    def lookup(self, s: str) -> int:
        """The id ``s`` names; ``ValueError`` when it names none or several (module docstring)."""
        if not isinstance(s, str):
            raise ValueError(f"token string {s!r}: expected a string")
        if s.startswith(ID_PREFIX):
            try:
                i = int(s[len(ID_PREFIX):])
            except ValueError:
                raise ValueError(f"token string {s!r}: not an integer after {ID_PREFIX!r}") from None
            if not 0 <= i < self.size:
                raise ValueError(f"token string {s!r}: id outside the tokenizer's {self.size} tokens "
                                 "(the server's model has another vocabulary?)")
            return i
        b = s.encode("utf-8", "surrogatepass")
        raw = s[len(BYTES_PREFIX):]
        if s.startswith(BYTES_PREFIX) and raw and _HEX.sub("", raw) == "":  # else a literal text "bytes:..."
            b = bytes(int(h, 16) for h in _HEX.findall(raw))
        ids = self._resolve(self.by_bytes.get(b, []))
        if len(ids) == 1:
            return ids[0]
        if not ids:
            why = " (a lossy rendering of part of a UTF-8 character)" if "\ufffd" in s or s == "" else ""
            raise ValueError(f"token string {s!r} is the text of no token of the source tokenizer{why}; "
                             "ask the server for token ids (vLLM: --return-tokens-as-token-ids) or check --tokenizer")
        raise ValueError(f"token string {s!r} is the text of {len(ids)} tokens of the source tokenizer "
                         f"(ids {ids[:8]}); a server that names tokens by text cannot tell them apart: "
                         "ask it for token ids (vLLM: --return-tokens-as-token-ids)")

    def consistent(self, s, i: int) -> bool:
        """Whether the server's string ``s`` can be its rendering of token ``i`` (the prompt check):
        the id, the bytes, the text, or a lossy text of a token that is not UTF-8 on its own
        (U+FFFD, or the bytes dropped), or nothing at all for a special token."""
        if not isinstance(s, str) or not 0 <= i < self.size:
            return False
        if s.startswith(ID_PREFIX):
            return s == f"{ID_PREFIX}{i}"
        b = self.surfaces[i]
        if s.encode("utf-8", "surrogatepass") == b or s in (b.decode("utf-8", "replace"), b.decode("utf-8", "ignore")):
            return True
        if s.startswith(BYTES_PREFIX) and bytes(int(h, 16) for h in _HEX.findall(s)) == b:
            return True
        return s == "" and bool(self.special[i])
