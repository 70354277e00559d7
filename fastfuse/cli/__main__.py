"""``python -m fastfuse.cli ARGS`` (the same as the ``fastfuse`` console script)."""
import sys

from fastfuse.cli import main

sys.exit(main())
