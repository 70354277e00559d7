"""Token surface forms: concatenated token bytes spell the (normalised) text on real tokenizers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastfuse.surface import gpt2_unicode_to_byte, normalized_text, token_surfaces

from conftest import REQUIRED_FAMILIES

FAMILIES = REQUIRED_FAMILIES + ["phi-3", "gpt-neox", "falcon", "starcoder"]
HARD_TEXTS = [
    "", " ", "  leading spaces", "tabs\tand\nnewlines\n\n", "Äpfel", "naïve café e\u0301",
    "你好世界，这是一个测试。", "🦙🚀😁 emoji", "def f(x):\n    return x ** 2  # code\n",
    "\u0915\u094d\u0937 Devanagari", "mixed 123,456.78 numbers 3333333", "\u200bzero\u200dwidth",
]


def test_gpt2_byte_table_is_a_bijection():
    table = gpt2_unicode_to_byte()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_on_real_text(real_tokenizer, corpus, name):
    tok = real_tokenizer(name)
    surf = token_surfaces(tok)
    assert len(surf) == len(tok) and surf.special.dtype == bool
    for text in corpus[::7] + HARD_TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert b"".join(surf.bytes[i] for i in ids) == normalized_text(tok, text), repr(text[:80])


@pytest.mark.parametrize("name", FAMILIES)
def test_special_tokens_flagged(real_tokenizer, name):
    tok = real_tokenizer(name)
    surf = token_surfaces(tok)
    for t in tok.all_special_ids:
        assert surf.special[t], (t, tok.convert_ids_to_tokens(t))
    assert surf.special.sum() < len(surf) // 100 + 300


def test_spm_rules_from_decoder(real_tokenizer):
    tok = real_tokenizer("llama-spm")
    surf = token_surfaces(tok)
    vocab = tok.get_vocab()
    assert surf.bytes[vocab["▁Hello"]] == b" Hello"
    assert surf.bytes[vocab["<0x0A>"]] == b"\n"
    assert surf.bytes[vocab["<0xF0>"]] == b"\xf0"
    bl = token_surfaces(real_tokenizer("gpt-2"))
    assert bl.bytes[real_tokenizer("gpt-2").get_vocab()["Ġworld"]] == b" world"


@pytest.fixture(scope="module")
def spm_and_bpe(real_tokenizer):
    return [(real_tokenizer(n), token_surfaces(real_tokenizer(n))) for n in ("llama-spm", "gpt-2")]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_fuzz(spm_and_bpe, text):
    for tok, surf in spm_and_bpe:
        ids = tok(text, add_special_tokens=False).input_ids
        assert b"".join(surf.bytes[i] for i in ids) == normalized_text(tok, text)


def test_slow_or_foreign_tokenizer_is_rejected():
    with pytest.raises(TypeError, match="tokenizer: expected a Hugging Face fast tokenizer"):
        token_surfaces(object())
