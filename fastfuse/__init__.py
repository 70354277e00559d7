"""fastfuse: fast knowledge fusion of LLMs with different tokenizers."""
from fastfuse._C import align_spans as _align_spans  # noqa: F401  (fails early if the core is not built)

__version__ = "0.1.0"
