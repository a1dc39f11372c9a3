"""Peak bytes of live tensors on one device, counted op by op.

Why: the planner's activation terms model what PyTorch keeps alive during a training step. On a GPU,
`torch.cuda.max_memory_allocated()` measures that; on a CPU nothing does (resident RAM mixes in the
interpreter, the libraries and the allocator's caching). This counter sees every tensor an ATen op
returns, so the planner can be checked on CPU, term by term, without a GPU:

    with LiveTensorBytes("cpu", model) as counter:
        trainer.train()
    counter.peak_bytes, counter.phase_peaks   # {"forward": ..., "backward": ..., "loss backward": ...}

Storages are counted once however many views share them, and leave the count when PyTorch frees them
(a weak-reference finalizer on the storage). Tensors made before the counter starts are not seen unless
passed in (`model`: its parameters, buffers and bitsandbytes' quantization state).

The count depends on which tensors exist and how big they are, not on their values. `NoArithmetic`, entered
inside the counter, skips the matrix products and attention kernels (each output is allocated, zero-filled, with
the shape, dtype and strides the op's own meta kernel gives) so a step at real model shapes is counted in
seconds on a CPU whose bfloat16 matmuls are emulated (AVX2: one 4,096-token layer takes minutes):

    with LiveTensorBytes("cpu", model) as counter, NoArithmetic():
        trainer.train()
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# Inside autograd's engine (a backward pass) this returns the node being run; a private API, hence the fallback
# (every op then counts as forward: the peaks stay right, only the phase names are lost).
_current_autograd_node = getattr(torch._C, "_current_autograd_node", lambda: None)


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, device: str = "cpu", model=None):
        super().__init__()
        self.device = torch.device(device).type  # "cuda:0" counts every CUDA tensor of the process
        self._lock = threading.Lock()  # a GPU's backward runs on autograd's device threads
        self._sizes: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase: str | None = None
        """Set by `loss_phases`; otherwise the phase is forward or backward (inside autograd's engine)."""
        self.phase_peaks: dict[str, int] = {}
        if model is not None:
            self.add_model(model)
        self.start_bytes = self.current_bytes

    def add_model(self, model) -> None:
        for parameter in model.parameters():
            self.add(parameter)
            self.add(parameter.grad)
            self._add_tensors_of(getattr(parameter, "quant_state", None))
        for buffer in model.buffers():
            self.add(buffer)

    def _add_tensors_of(self, state, depth: int = 0) -> None:
        """bitsandbytes' QuantState (absmax, code, the nested state of double quant) holds plain tensors."""
        if isinstance(state, torch.Tensor):
            self.add(state)
        elif state is not None and depth < 3 and hasattr(state, "__dict__"):
            for value in vars(state).values():
                self._add_tensors_of(value, depth + 1)

    def add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device or tensor.is_meta:
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse and other storage-less layouts: not counted
            return
        key, size = storage._cdata, storage.nbytes()
        with self._lock:
            known = self._sizes.get(key)
            if known == size:
                return
            if known is None:
                weakref.finalize(storage, self._free, key)
            self._sizes[key] = size
            self.current_bytes += size - (known or 0)  # a resize_ changes a known storage
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
            phase = self.phase or ("backward" if _current_autograd_node() is not None else "forward")
            if self.current_bytes > self.phase_peaks.get(phase, 0):
                self.phase_peaks[phase] = self.current_bytes

    def _free(self, key: int) -> None:
        with self._lock:
            self.current_bytes -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            self.add(value)
        return out


_aten = torch.ops.aten
PRODUCTS = frozenset({_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.addbmm, _aten._addmm_activation,
                      _aten._scaled_dot_product_flash_attention_for_cpu,
                      _aten._scaled_dot_product_flash_attention_for_cpu_backward})
"""Every product of a training step on a CPU: F.linear, matmul and einsum reach ATen as these; SDPA on a CPU is the
flash kernel."""
# Never skipped: they resize a tensor, or return a view without saying so in their schema.
_ALWAYS_RUN = frozenset({_aten.resize_, _aten.resize_as_, _aten.set_, _aten._unsafe_view, _aten.alias,
                         _aten.lift_fresh, _aten._reshape_alias, _aten.detach})


class NoArithmetic(TorchDispatchMode):
    """Allocate the outputs of ops without computing them: the matrix products and attention always, and with
    `min_elements` every other op that reads or writes a tensor of at least that many elements (the elementwise
    work on [tokens, 32768] loss tiles and [tokens, intermediate] activations, bitsandbytes' dequantization).

    What the live-tensor count sees is unchanged: the same ops run in the same order; a skipped op's outputs are
    allocated with the shapes, dtypes and strides its meta kernel gives (zero-filled, or left unwritten when it
    has `min_elements` or more: only skipped ops read those), in-place and out= variants write nothing and return
    their targets, and views, ops without a meta kernel and ops whose output size depends on values run for real.
    Only values differ, and no allocation of a CPU training step depends on values: tested against real arithmetic,
    phase by phase, in tests/test_tensor_peak.py and tests/test_bench.py. `skipped` counts the ops not computed."""

    def __init__(self, min_elements: int | None = None):
        super().__init__()
        self.min_elements = min_elements
        self.skipped = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._skips(func, args, kwargs):
            return func(*args, **kwargs)
        schema = func._schema.arguments
        named = {argument.name: value for argument, value in zip(schema, args, strict=False)} | kwargs
        written = [named[a.name] for a in schema if a.alias_info is not None and a.alias_info.is_write
                   and a.name in named]
        if written:  # in place or out=: the targets are the results, nothing is allocated
            self.skipped += 1
            returns = len(func._schema.returns)
            return None if returns == 0 else written[0] if returns == 1 else tuple(written)
        try:
            meta = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))  # shapes, dtypes, strides
        except Exception:  # noqa: BLE001 - no meta kernel, or a value-dependent output size: compute it
            return func(*args, **kwargs)
        outputs = [v for v in tree_flatten(meta)[0] if isinstance(v, torch.Tensor)]
        if func.overloadpacket not in PRODUCTS and not all(v.is_floating_point() for v in outputs):
            return func(*args, **kwargs)  # indices, masks, counts: values that later ops may branch on
        self.skipped += 1
        return tree_map(lambda value: _allocate_like(value, self.min_elements), meta)

    def _skips(self, func, args, kwargs) -> bool:
        if func.overloadpacket in PRODUCTS:
            return True
        if (self.min_elements is None or func.is_view or torch.Tag.nondeterministic_seeded in func.tags
                or func.overloadpacket in _ALWAYS_RUN):
            return False
        return any(isinstance(v, torch.Tensor) and v.numel() >= self.min_elements and v.is_floating_point()
                   and v.device.type == "cpu" for v in tree_flatten((args, kwargs))[0])


def _as_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _allocate_like(value, min_elements: int | None):
    """Zeros, except big outputs of the elementwise ops: left unwritten (no page is touched), and only other skipped
    ops read them. A scalar reduced from one (a loss, a norm) is a zero, as the branches after it expect."""
    if not isinstance(value, torch.Tensor):
        return value
    tensor = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
    return tensor if min_elements is not None and value.numel() >= min_elements else tensor.zero_()


@contextlib.contextmanager
def loss_phases(counter: LiveTensorBytes):
    """Name TRL's chunked loss (forward and backward) as phases of their own: its tiles never coexist with a
    recomputed layer, so the planner models the step's peak as the larger of the two, not their sum."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError:  # another TRL layout: the loss then counts as forward/backward, the peak stays right
        yield counter
        return
    originals = ChunkedLogProbFunction.forward, ChunkedLogProbFunction.backward

    def named(phase, function):
        def wrapped(*args, **kwargs):
            counter.phase = phase
            try:
                return function(*args, **kwargs)
            finally:
                counter.phase = None
        return staticmethod(wrapped)

    ChunkedLogProbFunction.forward = named("loss forward", originals[0])
    ChunkedLogProbFunction.backward = named("loss backward", originals[1])
    try:
        yield counter
    finally:
        ChunkedLogProbFunction.forward, ChunkedLogProbFunction.backward = (staticmethod(f) for f in originals)
