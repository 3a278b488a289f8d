"""Device memory as the device reports it, and whether a model replica fits in it.

:func:`device_memory` reads (free, total) bytes: ``torch.cuda.mem_get_info`` on a GPU, the
host's available memory (psutil, else ``sysconf``) on the CPU. :func:`replica_fits` compares a
full replica's bytes plus a margin with the free memory, keeping :data:`HEADROOM` of it unused.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

#: Share of the free memory a plan may use; the rest absorbs fragmentation and allocator caches.
HEADROOM = 0.9


def device_memory(device: Any) -> tuple[int, int]:
    """(free, total) bytes of ``device``: the GPU's own view on CUDA, the host's available
    memory otherwise.

    >>> free, total = device_memory("cpu")
    >>> 0 < free <= total
    True
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        import psutil
    except ImportError:  # a slim environment (no Ray): what the kernel calls free
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    mem = psutil.virtual_memory()
    return int(mem.available), int(mem.total)


def replica_bytes(n_params: int, bytes_per_param: int, margin: int = 0, sharers: int = 1) -> int:
    """Bytes that ``sharers`` replicas of ``n_params`` parameters need, each with ``margin`` more.

    >>> replica_bytes(7_600_000_000, 2, margin=2 * 2**30) / 2**30
    16.156...
    """
    return sharers * (n_params * bytes_per_param + margin)


def replica_fits(n_params: int, bytes_per_param: int, free: int, margin: int = 0, sharers: int = 1) -> bool:
    """Whether ``sharers`` replicas (ranks on the same device: the host's CPU ranks) plus their
    margins fit in :data:`HEADROOM` of ``free`` bytes.

    >>> replica_fits(7_600_000_000, 2, free=100 * 2**30, margin=4 * 2**30)   # a 7B in bf16, H200
    True
    >>> replica_fits(7_600_000_000, 2, free=12 * 2**30)                      # a 16 GiB card, mid-run
    False
    >>> replica_fits(1_000, 4, free=10_000, sharers=2)
    True
    >>> replica_fits(1_000, 4, free=10_000, sharers=3)
    False
    """
    return replica_bytes(n_params, bytes_per_param, margin, sharers) <= HEADROOM * free
