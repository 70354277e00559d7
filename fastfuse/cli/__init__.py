"""The ``fastfuse`` command line: one parser, handlers imported only for the command that runs.

Library functions raise ``ValueError``/``TypeError`` naming their own arguments; handlers raise
:class:`CommandError` naming flags. Either way the user sees one ``fastfuse: error: ...`` line on
stderr and exit status 2 (``--verbose`` adds the traceback). So does a missing optional dependency
(torch, transformers, ...): the line names the extra that installs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from fastfuse import __version__
from fastfuse.cli.errors import CommandError
from fastfuse.extras import missing_extra

__all__ = ["main", "build_parser", "CommandError"]

# command -> (module under fastfuse.cli that registers it, the function that adds its parser)
_COMMANDS = {
    "chunk": ("pipeline", "add_chunk"),
    "extract": ("pipeline", "add_extract"),
    "align": ("pipeline", "add_align"),
    "demo": ("demos", "add_demo"),
    "align-demo": ("demos", "add_align_demo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfuse",
                                     description="Fast knowledge fusion of LLMs with different tokenizers.")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"fastfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module, adder in _COMMANDS.values():
        getattr(importlib.import_module(f"fastfuse.cli.{module}"), adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastfuse ARGS``; returns the exit status (0, or 2 after an error)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError) as e:   # OSError: a missing directory, a full disk, EFBIG...
        return _error(args, str(e))
    except ModuleNotFoundError as e:                 # not an OSError; only optional dependencies are ours
        hint = missing_extra(e)
        if hint is None:
            raise
        return _error(args, f"fastfuse {args.command} needs {hint}")
    return 0


def _error(args: argparse.Namespace, message: str) -> int:
    if args.verbose:
        traceback.print_exc()
    print(f"fastfuse: error: {message}", file=sys.stderr)
    return 2
