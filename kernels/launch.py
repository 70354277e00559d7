"""Which launch configuration each row kernel runs: the named configurations (today's and the
candidates a GPU run compares), the tables that pick among them, and the two ways to override them.

* ``forced(kernel, name)`` -- a context manager (a ``ContextVar``, so nothing global is left set
  when a test or benchmark fails mid-way): ``"fused_ce"`` takes a name in ``fused_ce.CONFIGS`` or a
  ``RowConfig`` (or ``(BLOCK_V, num_warps)``), ``"divergence"`` a name in ``divergence.LAUNCHES`` or
  a dict of its launch, ``"rescale"`` a name in ``fused_ce.RESCALES``;
* ``launch_tuned.json`` beside this file (absent until a GPU run writes one:
  ``benchmarks/gpu_candidates.py`` times every candidate and writes the winners) -- entries
  ``{"fused_ce": {"two_pass/bf16/9": name, ...}, "divergence": {"9": name}, "rescale": {"9": name}}``
  that take precedence over the hand-written tables for the architectures they name.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os

_FORCED = {k: contextvars.ContextVar(f"fastfuse_forced_{k}", default=None) for k in ("fused_ce", "divergence", "rescale")}
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_tuned.json")


@contextlib.contextmanager
def forced(kernel: str, config):
    """Within the block, ``kernel``'s launches use ``config`` (see the module docstring)."""
    if kernel not in _FORCED:
        raise ValueError(f"kernel must be one of {sorted(_FORCED)}, got {kernel!r}")
    token = _FORCED[kernel].set(config)
    try:
        yield
    finally:
        _FORCED[kernel].reset(token)


def forced_config(kernel: str):
    """The configuration forced for ``kernel`` in this context, or None."""
    return _FORCED[kernel].get()


_tuned_cache: dict = {}


def load_tuned(path: str = TUNED_PATH) -> dict:
    """(Re)load the winners' table from ``path`` (default: ``launch_tuned.json`` beside this file);
    a missing or unreadable file, or a dry run's (``"dry_run": true``: no measurement), is no table."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    _tuned_cache["table"] = {} if table.get("dry_run") else table
    return _tuned_cache["table"]


def tuned(kernel: str, key: str):
    """The winning configuration name a GPU run recorded for ``kernel`` at ``key``, or None."""
    table = _tuned_cache["table"] if "table" in _tuned_cache else load_tuned()
    return table.get(kernel, {}).get(key)
