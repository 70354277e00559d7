"""Which optional extra provides which import, for a missing-dependency error that says what to install.

The wheel's required dependencies are numpy, safetensors and tqdm (the alignment core, shards); the
loss, extraction, training and the demo need the ``torch`` extra, real tokenizers and Hugging Face
models the ``hf`` extra, served teachers the ``served`` extra. Torch-free: imported by the package
root and the command line before anything heavy.
"""
from __future__ import annotations

# top-level import name -> the extra of pyproject.toml that installs it
EXTRA_OF_MODULE = {
    "torch": "torch", "triton": "torch",
    "transformers": "hf", "tokenizers": "hf", "sentencepiece": "hf", "gguf": "hf", "accelerate": "hf",
    "requests": "served",
}


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` (torch and hf go together: every model path needs both)."""
    extras = "torch,hf" if extra in ("torch", "hf") else extra
    return f'pip install "fastfuse[{extras}]"'


def missing_extra(error: BaseException) -> str | None:
    """For a ``ModuleNotFoundError`` of an optional dependency, the module and the extra that installs
    it (to follow "... needs "); ``None`` for anything else (a real bug must keep its traceback)."""
    name = (getattr(error, "name", None) or "") if isinstance(error, ModuleNotFoundError) else ""
    extra = EXTRA_OF_MODULE.get(name.split(".")[0])
    if extra is None:
        return None
    return f"'{name.split('.')[0]}', which is not installed (the '{extra}' extra): {install_hint(extra)}"


def require(*modules: str) -> None:
    """``ModuleNotFoundError`` for the first of ``modules`` that is not installed, before a slow start."""
    import importlib.util

    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise ModuleNotFoundError(f"No module named {m!r}", name=m)
