"""How much memory the run uses right now: GPU memory on CUDA, the process's RAM on CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass(frozen=True)
class MemorySnapshot:
    kind: str
    """`VRAM` or `RAM`."""
    used_gib: float
    """Allocated by tensors now (VRAM) or resident set size (RAM)."""
    peak_gib: float
    """Peak reserved by the CUDA allocator since start (what decides an OOM), or peak RSS."""
    total_gib: float


def snapshot() -> MemorySnapshot:
    if torch.cuda.is_available():
        _, total = torch.cuda.mem_get_info()
        return MemorySnapshot("VRAM", torch.cuda.memory_allocated() / GIB,
                              torch.cuda.max_memory_reserved() / GIB, total / GIB)
    import psutil

    process = psutil.Process()
    rss = process.memory_info().rss
    peak = _peak_rss_bytes() or rss
    return MemorySnapshot("RAM", rss / GIB, max(peak, rss) / GIB, psutil.virtual_memory().total / GIB)


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
