"""Where this rank's vocabulary shard lies, how the ranks agree on their arguments, and the few
collectives of the vocabulary-parallel loss (``fastfuse.loss.parallel.losses``, DESIGN.md §4).

A rank holds the target ids ``[start, start + size)``; the ranks' ranges tile ``[0, V)``. They come
from a DTensor's ``Shard`` placement (torch's shards are contiguous, in mesh order, possibly
uneven), from an explicit ``vocab_start`` per rank, or else from the shards' sizes in group-rank
order. Before any loss collective the ranks exchange one small vector (:func:`agree`): shapes,
dtypes, the loss arguments and, with ``validate``, fingerprints of the teacher tensors. A rank whose
arguments fail a local check takes part in that exchange too, so every rank raises (no rank is
left waiting in a collective that the others never enter).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_dtensor", "dtensor_local", "group_of", "agree", "fingerprint", "VocabLayout", "vocab_layout"]


def is_dtensor(x) -> bool:
    """``x`` is a ``torch.distributed.tensor.DTensor`` (without importing that package when no
    DTensor can exist yet)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def group_of(process_group, name: str = "process_group"):
    """``(group, rank, world)`` of a ``torch.distributed`` process group this process belongs to."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name}: torch.distributed is not initialised (init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return process_group, rank, dist.get_world_size(process_group)


def dtensor_local(x, dim: Optional[int], name: str, process_group=None) -> Tuple[Tensor, object]:
    """(local tensor, process group) of a DTensor placed ``Shard(dim)`` over one mesh dimension (the
    others ``Replicate``), or ``Replicate`` everywhere when ``dim`` is None (group: None). The
    gradient flows back through ``to_local`` into a DTensor of the same placement."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(x.placements)
    if dim is None:
        if not all(isinstance(p, Replicate) for p in placements):
            raise ValueError(f"{name} must be a replicated DTensor here, got placements {placements}")
        return x.to_local(), None
    dim = dim % x.dim()
    split = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(split) != 1 or not (isinstance(placements[split[0]], Shard) and placements[split[0]].dim == dim):
        raise ValueError(f"{name} must be a DTensor sharded on dim {dim} over one mesh dimension (Shard({dim}), "
                         f"Replicate elsewhere), got placements {placements}")
    mesh = x.device_mesh
    group = mesh.get_group(split[0])
    if process_group is not None and (dist.get_process_group_ranks(process_group)
                                      != dist.get_process_group_ranks(group)):
        raise ValueError(f"process_group is not the group {name} is sharded over (ranks "
                         f"{dist.get_process_group_ranks(group)}); pass process_group=None or that group")
    if mesh.get_local_rank(split[0]) != dist.get_rank(group):     # shards are in mesh order
        raise ValueError(f"{name}: the mesh's coordinate order differs from its group's rank order")
    return x.to_local(), group


def fingerprint(tensors: Sequence[Optional[Tensor]], device) -> Tensor:
    """One int64 per tensor that equal tensors share: position-weighted sums (floats: their finite
    values' float64 sum as bits, plus a count of the others). A cheap content check, not a hash."""
    out = []
    for t in tensors:
        if t is None:
            out.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        flat = t.reshape(-1)
        w = torch.arange(flat.numel(), device=flat.device) % 251 + 1
        if flat.is_floating_point():
            x = flat.to(torch.float64)
            ok = torch.isfinite(x)
            s = (torch.where(ok, x, torch.zeros_like(x)) * w).sum().view(torch.int64)
            out.append(s + 1000003 * (w * (~ok) * (1 + torch.isnan(x))).sum())
        else:
            out.append((flat.long() * w).sum())
    return torch.stack(out).to(device)


def agree(fields: Dict[str, int], free: Sequence[str], group, device, fp: Optional[Tensor], failed: bool,
          owner: str, shown: Optional[Dict[str, Callable[[int], str]]] = None) -> Optional[List[Dict[str, int]]]:
    """All-gather this rank's ``fields`` (its local validation ``failed`` or not, and the content
    fingerprint ``fp``) and check that the ranks agree on every field not in ``free``; returns every
    rank's fields, in group-rank order. ``ValueError`` naming the field and the ranks otherwise, on
    every rank. A ``failed`` rank gets None back and raises its own error."""
    names = list(fields)
    n_fp = 0 if fp is None else fp.numel()
    local = torch.tensor([int(failed)] + [int(fields[k]) for k in names], dtype=torch.int64, device=device)
    if fp is not None:
        local = torch.cat([local, fp.to(device=device, dtype=torch.int64)])
    world = dist.get_world_size(group)
    every = torch.empty(world * local.numel(), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(every, local, group=group)
    rows = every.view(world, -1).tolist()           # the one host sync of the check
    if failed:
        return None
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"{owner}: rank {bad[0]} of process_group rejected its arguments (see that rank's error); "
                         "every rank stops here")
    per_rank = [dict(zip(names, row[1:1 + len(names)])) for row in rows]
    show = shown or {}
    for k in names:
        if k in free:
            continue
        values = [d[k] for d in per_rank]
        r = next((i for i, v in enumerate(values) if v != values[0]), None)
        if r is not None:
            f = show.get(k, str)
            raise ValueError(f"{owner}: the ranks of process_group disagree on {k}: rank 0 has {f(values[0])}, "
                             f"rank {r} has {f(values[r])} (every rank must pass the same arguments but its shard)")
    if n_fp:
        r = next((i for i, row in enumerate(rows) if row[-n_fp:] != rows[0][-n_fp:]), None)
        if r is not None:
            raise ValueError(f"{owner}: the ranks of process_group disagree on the contents of labels, source_topk, "
                             f"align_map or source_weights (rank 0 and rank {r}); every rank needs the same "
                             "teacher and labels")
    return per_rank


class VocabLayout(NamedTuple):
    """The ranks' vocabulary ranges (``starts``/``sizes`` in group-rank order) and, under sequence
    parallelism, their shares of the tokens (``tokens``); the collectives of the loss (run for a
    one-rank group too: its cost is what ``benchmarks/gpu_tp_loss.py`` measures on one GPU)."""
    group: object
    rank: int
    starts: Tuple[int, ...]
    sizes: Tuple[int, ...]
    tokens: Optional[Tuple[int, ...]] = None

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    def all_gather(self, x: Tensor) -> Tensor:
        """``[W, *x.shape]``: every rank's ``x`` (equal shapes), in rank order."""
        out = torch.empty(self.world * x.numel(), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=self.group)   # flat: gloo's layout rule
        return out.view((self.world,) + tuple(x.shape))

    def all_reduce(self, x: Tensor) -> Tensor:
        """``x`` summed over the ranks, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_tokens(self, x: Tensor) -> Tensor:
        """``[B, T, H]`` from every rank's ``[B, T_r, H]`` share of the sequence (uneven: padded)."""
        tokens = self.token_split()
        pad = max(tokens)
        part = x if x.shape[1] == pad else torch.cat([x, x.new_zeros(x.shape[0], pad - x.shape[1], x.shape[2])], 1)
        every = self.all_gather(part)
        return torch.cat([every[r, :, :n] for r, n in enumerate(tokens)], 1)

    def scatter_tokens(self, x: Tensor) -> Tensor:
        """This rank's ``[B, T_r, H]`` share of ``x [B, T, H]`` summed over the ranks (one
        reduce-scatter)."""
        tokens = self.token_split()
        pad, B, H = max(tokens), x.shape[0], x.shape[2]
        send = x.new_zeros(self.world * B, pad, H)      # rank r's part: rows [r*B, (r+1)*B)
        for r, (a, n) in enumerate(zip(_offsets(tokens), tokens)):
            send[r * B:(r + 1) * B, :n] = x[:, a:a + n]
        out = x.new_empty(B, pad, H)
        dist.reduce_scatter_tensor(out, send, group=self.group)
        return out[:, :tokens[self.rank]]

    def token_split(self) -> Tuple[int, ...]:
        """Each rank's number of tokens (sequence parallelism only)."""
        if self.tokens is None:
            raise RuntimeError("this vocabulary layout has no token split: it was built without sequence_parallel")
        return self.tokens


def _offsets(sizes: Sequence[int]) -> List[int]:
    out, a = [], 0
    for n in sizes:
        out.append(a)
        a += n
    return out


def vocab_layout(group, rank: int, sizes: Sequence[int], starts: Optional[Sequence[int]],
                 tokens: Optional[Sequence[int]] = None) -> VocabLayout:
    """The layout of shards of ``sizes``: at ``starts`` (one per rank; ``ValueError`` unless the
    ranges tile ``[0, sum(sizes))``), or contiguous in rank order when ``starts`` is None."""
    sizes = tuple(int(n) for n in sizes)
    if starts is None:
        starts = tuple(_offsets(sizes))
    else:
        starts = tuple(int(s) for s in starts)
        order = sorted(range(len(sizes)), key=lambda r: starts[r])
        if [starts[r] for r in order] != _offsets([sizes[r] for r in order]):
            got = ", ".join(f"rank {r}: [{starts[r]}, {starts[r] + sizes[r]})" for r in range(len(sizes)))
            raise ValueError(f"vocab_start: the ranks' vocabulary ranges must tile [0, V) with V = {sum(sizes)} "
                             f"(the sum of the shards' sizes) without gaps or overlaps; got {got}")
    return VocabLayout(group, rank, starts, sizes, None if tokens is None else tuple(int(t) for t in tokens))
