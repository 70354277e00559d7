"""``--rank`` / ``--world-size`` for ``fastfuse extract``: one process of a distributed run (a local
model, or ``--server``: many clients sharing one or several servers, each asking for its share only).

Under ``torchrun`` the flags default to its environment (``RANK``, ``WORLD_SIZE``), and each rank
takes GPU ``LOCAL_RANK`` when CUDA is available and ``--device`` is not given. Ranks never talk
to each other (no process group), so any launcher works: torchrun, Slurm (set the two flags), or
plain processes started by hand.
"""
from __future__ import annotations

import argparse
import os

from fastfuse.cli.errors import CommandError


def add_rank_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None,
                   help="this process's rank in a distributed extraction (default: $RANK, else 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes sharing the corpus; each writes OUT/rank-RRRRR-of-WWWWW "
                        "(default: $WORLD_SIZE, else 1)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"${name}: expected an integer, got {value!r}") from None


def rank_and_world(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size) from the flags, else torchrun's environment, else (0, 1)."""
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
    rank = args.rank if args.rank is not None else _env_int("RANK")
    world = 1 if world is None else world
    rank = 0 if rank is None else rank
    if world < 1:
        raise CommandError(f"--world-size: expected a positive integer, got {world}")
    if not 0 <= rank < world:
        raise CommandError(f"--rank: {rank} is not in [0, {world}) (--world-size {world})")
    return rank, world


def rank_device(args: argparse.Namespace) -> str | None:
    """``--device``, else ``cuda:$LOCAL_RANK`` when launched with LOCAL_RANK and CUDA is available."""
    local = _env_int("LOCAL_RANK")
    if args.device is not None or local is None:
        return args.device
    import torch

    if not torch.cuda.is_available():
        return None
    if not 0 <= local < torch.cuda.device_count():
        raise CommandError(f"$LOCAL_RANK: {local}, but this machine has {torch.cuda.device_count()} CUDA devices "
                           "(start at most that many processes per node, or pass --device)")
    return f"cuda:{local}"
