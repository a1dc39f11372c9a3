"""Who this process is when launched with torchrun / accelerate launch (one process per GPU).

Each rank holds its own 4-bit copy of the model and trains on its share of every batch; the
trainer (through accelerate) wraps the model in DistributedDataParallel and averages gradients.
Only rank 0 talks to the user and writes files: everything here keeps the other ranks quiet and in
step with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Processes:
    """Read the launcher's environment (torchrun and accelerate both set these)."""
    env = os.environ
    return Processes(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def start() -> Processes:
    """Join the process group early (gloo on CPU, nccl on GPUs), so ranks can wait for each other
    before the trainer exists; accelerate reuses this group."""
    processes = current()
    if processes.distributed:
        from accelerate import PartialState

        PartialState()
    return processes


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one: ranks must stop at the same step or they deadlock."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def allow_fsdp_on_cpu() -> None:
    """accelerate (1.15, state.py AcceleratorState.__init__) turns a given fsdp_plugin into
    DistributedType.FSDP only for MULTI_GPU/NPU/XPU/...; under MULTI_CPU (gloo) it drops the plugin
    silently and the trainer wraps the model in DDP. Promote MULTI_CPU + plugin to FSDP."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_qlora_kit_cpu_fsdp", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._qlora_kit_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
