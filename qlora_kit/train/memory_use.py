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
    peak = peak_rss_bytes() or rss
    return MemorySnapshot("RAM", rss / GIB, max(peak, rss) / GIB, psutil.virtual_memory().total / GIB)


def peak_rss_bytes() -> int:
    """The process's own peak resident set. Linux: VmHWM in /proc/self/status, because getrusage's ru_maxrss outlives
    exec: a run started by a large parent (the studio, a test runner at 1.4 GiB) reported the parent's size as its
    peak. macOS: ru_maxrss, in bytes there. Windows: the peak working set. 0 when none can be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0) or 0)
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
