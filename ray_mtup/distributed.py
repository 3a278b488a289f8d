"""The process group and the collectives of the training loop, in one place.

* :func:`init_distributed` makes DeepSpeed's comm layer adopt (or create) the process group;
* :func:`shard` splits n items over the ranks, padded to the same length everywhere;
* :func:`gather`, :func:`all_reduce` and :func:`barrier` are the collectives the loop, the
  evaluation and the memory planner use; with one rank they need no process group.

torch and DeepSpeed are imported when a function is called, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any, Sequence


def init_distributed(on_gpu: bool) -> None:
    """Make DeepSpeed's comm layer adopt the process group its launcher created (Ray Train or
    torchrun), or create it from the torchrun environment.

    DeepSpeed's config checks ``train_batch_size`` against its own view of the world size:
    before its comm layer is up that view is 1, which is what broke every multi-worker ZeRO-3
    run on real checkpoints (``HfDeepSpeedConfig`` is built before the engine).
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def shard(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices of rank's shard padded (with repeats) to the same length on every rank.

    Returns (indices, number of real ones).

    >>> shard(5, 1, 2)
    ([1, 3, 1], 2)
    """
    own = list(range(rank, n, world))
    per_rank = -(-n // world)
    real = len(own)
    padded = own + [own[i % len(own)] if own else 0 for i in range(per_rank - real)]
    return padded, real


def gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order."""
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values: Sequence[float], device: Any, world: int, op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over ranks, as floats."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def barrier(world: int) -> None:
    """Wait for every rank (a no-op with one rank or without a process group)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()
