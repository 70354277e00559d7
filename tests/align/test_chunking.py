"""Document splitting: every tokenizer's tokenisation of every chunk fits the block size."""
import pytest
from hypothesis import given, settings, strategies as st

from fastfuse.align.spans import TokenizerOffsets
from fastfuse.align.chunking import split_corpus, split_document


@pytest.fixture(scope="module")
def offsets(real_tokenizer):
    return [TokenizerOffsets(real_tokenizer(n)) for n in ("llama-bpe", "llama-spm", "gpt-2")]


def n_tokens(tok, text):
    return len(tok.encode([text], add_special_tokens=False)[0][0])


@pytest.mark.parametrize("block_size", [16, 100, 512])
def test_chunks_fit_every_tokenizer_and_rebuild_the_text(offsets, corpus, block_size):
    texts = corpus[:25]
    chunks = split_corpus(texts, offsets, block_size)
    for d, text in enumerate(texts):
        assert "".join(c for i, c in chunks if i == d) == text
    for _, c in chunks:
        assert c
        assert max(n_tokens(t, c) for t in offsets) <= block_size - 2
    # chunks are not needlessly small
    assert len(chunks) < 2 * sum(max(n_tokens(t, x) for t in offsets) for x in texts) / (block_size - 2) + len(texts)


def test_short_text_is_one_chunk(offsets):
    assert split_document("Hello world", offsets, 64) == ["Hello world"]
    assert split_document("", offsets, 64) == [""]


def test_prefers_cuts_before_whitespace(offsets, corpus):
    chunks = split_document(corpus[3], offsets, 128)
    assert len(chunks) > 2
    starts_with_space = sum(c[:1].isspace() for c in chunks[1:])
    assert starts_with_space >= 0.8 * (len(chunks) - 1)


@settings(max_examples=30, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=300))
def test_fuzz(offsets, text):
    chunks = split_document(text, offsets, 24)
    assert "".join(chunks) == text
    for c in chunks:
        assert max(n_tokens(t, c) for t in offsets) <= 22


def test_bad_arguments(offsets):
    with pytest.raises(ValueError, match="block_size"):
        split_document("x", offsets, 2)
    with pytest.raises(TypeError, match="text"):
        split_document(b"x", offsets, 16)
    with pytest.raises(ValueError, match="tokenizers"):
        split_document("x", [], 16)
