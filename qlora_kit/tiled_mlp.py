"""Sequence-tiled MLP: the decoder's MLP runs over slices of the sequence, so its large intermediate tensors
(gate, up, their product: `intermediate_size` wide, 5x the hidden size on R1-Distill-Qwen-7B) exist for one
slice at a time instead of the whole sequence.

Why: with gradient checkpointing, the backward of one recomputed layer is the step's peak, and about two thirds
of it are those MLP intermediates and their gradients (qlora_kit.plan.PROFILES, measured). Tiling bounds them
by the slice length, so the peak grows much more slowly with the sequence. The price is one more forward pass
of each MLP (forward, checkpoint recompute, and the recompute inside this backward): ~20 % more compute.

The idea is the Mini-Sequence Transformer / Arctic long-sequence training "TiledMLP" (DeepSpeed ships one, which
qlora_kit does not depend on). Each slice is recomputed with gradients enabled in the backward pass and
back-propagated on its own; the LoRA weights' gradients accumulate in `.grad` like any other.
"""

from __future__ import annotations

import types

import torch

from qlora_kit.recipe import TILED_MLP_SLICE_TOKENS as SLICE_TOKENS


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, slice_tokens: int, x: torch.Tensor, *weights: torch.Tensor):
        # `weights` are passed only so that autograd reaches this node when they need gradients; their gradients
        # are accumulated by the inner backward below, not returned.
        ctx.mlp_forward, ctx.slice_tokens = mlp_forward, slice_tokens
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp_forward(part) for part in x.split(slice_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        device_type, enabled, dtype = ctx.autocast
        start = 0
        for part, grad_part in zip(x.split(ctx.slice_tokens, dim=-2), grad_output.split(ctx.slice_tokens, dim=-2),
                                   strict=True):
            part = part.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out = ctx.mlp_forward(part)
            if out.requires_grad:
                torch.autograd.backward(out, grad_part)
            if grad_x is not None:
                grad_x[..., start:start + part.shape[-2], :] = part.grad
            start += part.shape[-2]
        return None, None, grad_x, *([None] * (len(ctx.needs_input_grad) - 3))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The forward's autocast, to recompute each slice exactly as it was computed (backward runs outside it)."""
    enabled = torch.is_autocast_enabled(device_type)
    return device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else torch.float32


def tile_mlps(model, slice_tokens: int = SLICE_TOKENS) -> int:
    """Make every decoder MLP (`*.mlp` modules of Llama/Qwen2-style models) run sequence-tiled; returns how many."""
    tiled = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or getattr(module, "_qlora_kit_tiled", False):
            continue
        plain_forward = module.forward

        def tiled_forward(self, x, _plain=plain_forward):
            if x.shape[-2] <= slice_tokens:
                return _plain(x)  # one slice: tiling would only add the extra recompute
            weights = [p for p in self.parameters() if p.requires_grad]
            return _TiledMLPFunction.apply(_plain, slice_tokens, x, *weights)

        module.forward = types.MethodType(tiled_forward, module)
        module._qlora_kit_tiled = True
        tiled += 1
    return tiled
