"""Shared fixtures: real tokenizers of several model families, offline after one download."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub

import functools

import pytest

REQUIRED_FAMILIES = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "mpt"]


@functools.lru_cache(maxsize=None)
def _load(name: str):
    from fastfuse.tokenizer_files import load_tokenizer

    return load_tokenizer(name)


@pytest.fixture(scope="session")
def vocab_dir():
    """Directory with llama.cpp's ggml-vocab-* files (downloads and checks the sdist once)."""
    from fastfuse.tokenizer_files import ensure_vocab_files

    return ensure_vocab_files()


@pytest.fixture(scope="session")
def real_tokenizer(vocab_dir):
    """real_tokenizer(name) -> a Hugging Face fast tokenizer, converted once and cached."""
    return _load


@pytest.fixture(scope="session")
def corpus():
    """Real English text that ships with Python: the pydoc topic pages."""
    from fastfuse.corpus import python_docs

    return python_docs()
