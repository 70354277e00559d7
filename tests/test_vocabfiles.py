"""The offline real-tokenizer fixture reproduces llama.cpp's expected tokenisations."""
import pytest

from fastfuse.vocabfiles import SDIST_SHA256, TOKENIZERS, vocab_test_cases

from conftest import REQUIRED_FAMILIES


def test_cache_is_complete_and_checked(vocab_dir):
    assert (vocab_dir / ".complete").read_text() == SDIST_SHA256
    for name in TOKENIZERS:
        assert (vocab_dir / f"ggml-vocab-{name}.gguf").stat().st_size > 100_000


@pytest.mark.parametrize("name", REQUIRED_FAMILIES + ["phi-3"])
def test_tokenizer_matches_llama_cpp_vectors(real_tokenizer, name):
    tok = real_tokenizer(name)
    cases = vocab_test_cases(name)
    assert len(cases) >= 40
    for case in cases:
        assert tok(case.text, add_special_tokens=False).input_ids == case.ids, repr(case.text)


@pytest.mark.parametrize("name,size", [("llama-spm", 32000), ("llama-bpe", 128256), ("gpt-2", 50257), ("mpt", 50432)])
def test_vocab_sizes(real_tokenizer, name, size):
    assert real_tokenizer(name).backend_tokenizer.get_vocab_size(with_added_tokens=False) >= size - 300
    assert len(real_tokenizer(name)) >= size


def test_unknown_name_is_a_clear_error():
    from fastfuse.vocabfiles import load_tokenizer

    with pytest.raises(ValueError, match="name: unknown tokenizer"):
        load_tokenizer("no-such-model")
