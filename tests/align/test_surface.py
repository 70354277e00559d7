"""Token surface forms: concatenated token bytes spell the (normalised) text on real tokenizers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastfuse.align.surface import gpt2_unicode_to_byte, normalized_text, token_surfaces

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


def _gapped_tokenizer():
    """A real tokenizers.Tokenizer whose ids skip 3, 4 and 8 (added tokens then take 5 and 6)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "ab": 7, "c": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    tok.add_tokens(["zz"])
    assert tok.get_vocab_size(with_added_tokens=True) == 7  # tokens, not ids
    return tok


def test_vocabulary_with_id_gaps():
    # ids >= get_vocab_size() (7 and 9 here) used to be dropped.
    tok = _gapped_tokenizer()
    surf = token_surfaces(tok)
    assert len(surf) == 10
    assert surf.bytes == [b"[UNK]", b"a", b"b", b"", b"", b"<s>", b"zz", b"ab", b"", b"c"]
    assert surf.missing.tolist() == [k in (3, 4, 8) for k in range(10)]
    assert surf.special.tolist() == [k == 5 for k in range(10)]
    ids = tok.encode("ab c zz a", add_special_tokens=False).ids
    assert ids == [7, 9, 6, 1] and b" ".join(surf.bytes[i] for i in ids) == b"ab c zz a"


def test_vocabulary_with_id_gaps_aligns_and_maps():
    from fastfuse.align.spans import TokenizerOffsets
    from fastfuse.align.vocab_map import VocabMap

    tok = _gapped_tokenizer()
    (ids, ends), = TokenizerOffsets(tok).encode(["ab c"])
    assert ids.tolist() == [7, 9] and ends.tolist() == [2, 4]
    vm = VocabMap.build(tok, tok, "exact")
    assert vm.src_size == vm.tgt_size == 10
    assert vm.ids.tolist() == [0, 1, 2, -1, -1, 5, 6, 7, -1, 9]  # gaps map to nothing
