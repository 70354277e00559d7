"""``python -m fastfuse ARGS`` (the same as the ``fastfuse`` console script; works under torchrun)."""
import sys

from fastfuse.cli import main

sys.exit(main())
