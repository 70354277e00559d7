"""Shared fixtures: real tokenizers of several model families, offline after one download; and the
``interpreter`` marker's two sessions (tests/_interpreter.py)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub

# Tests import the installed package, never the source tree's top-level folders: `python -m pytest`
# puts the repository root on sys.path, where kernels/ (installed as fastfuse.kernels) would shadow
# the PyPI package `kernels` that transformers >= 5.25 imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import functools

import pytest

from _interpreter import plugin as interpreter_plugin

REQUIRED_FAMILIES = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "mpt"]


def pytest_configure(config):
    config.pluginmanager.register(interpreter_plugin(config), "fastfuse-interpreter")


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
