"""Sequence-tiled MLP: the decoder's MLP runs over slices of the sequence, so its large intermediate tensors
(gate, up, their product: `intermediate_size` wide, 5x the hidden size on R1-Distill-Qwen-7B) exist for one
slice at a time instead of the whole sequence.

Why: with gradient checkpointing, the backward of one recomputed layer is the step's peak, and about two thirds
of it are those MLP intermediates and their gradients (qlora_kit.plan.estimate.PROFILES, measured). Tiling bounds them
by the slice length, so the peak grows much more slowly with the sequence. The price is one more forward pass
of each MLP (forward, checkpoint recompute, and the recompute inside this backward): with the MLP about 2/3 of
a layer's matmuls and a checkpointed step costing ~4 forwards, about 1/6 more matmul work.

The idea is the Mini-Sequence Transformer / Arctic long-sequence training "TiledMLP" (DeepSpeed ships one, which
qlora_kit does not depend on). Each slice is recomputed with gradients enabled in the backward pass (with the
random state of the forward, so LoRA dropout draws the same masks) and differentiated on its own; the LoRA
weights' gradients are summed over the slices and handed back to autograd, which accumulates them once.
"""

from __future__ import annotations

import types

import torch

from qlora_kit.recipe.schema import TILED_MLP_SLICE_TOKENS as SLICE_TOKENS


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, slice_tokens: int, x: torch.Tensor, *weights: torch.Tensor):
        ctx.mlp_forward, ctx.slice_tokens = mlp_forward, slice_tokens
        ctx.autocast = _autocast_state(x.device.type)
        # LoRA dropout draws random masks: the backward's recompute must draw the same ones.
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, *weights)
        with torch.no_grad():
            return torch.cat([mlp_forward(part) for part in x.split(slice_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, *weights = ctx.saved_tensors
        wants_x = ctx.needs_input_grad[2]
        wanted = [w for w, needed in zip(weights, ctx.needs_input_grad[3:], strict=True) if needed]
        grad_x = torch.empty_like(x) if wants_x else None
        grad_weights = [None] * len(wanted)
        device_type, enabled, dtype = ctx.autocast
        start = 0
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            _set_rng_state(x.device, ctx.rng)
            for part, grad_part in zip(x.split(ctx.slice_tokens, dim=-2), grad_output.split(ctx.slice_tokens, dim=-2),
                                       strict=True):
                part = part.detach().requires_grad_(wants_x)
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    out = ctx.mlp_forward(part)
                inputs = ([part] if wants_x else []) + wanted
                # Gradients are returned, not accumulated into .grad here: autograd then adds them to the
                # weights once per step, so data-parallel hooks (DDP) fire once, as for an untiled MLP.
                grads = torch.autograd.grad(out, inputs, grad_part, allow_unused=True) if inputs else ()
                if wants_x:
                    grad_x[..., start:start + part.shape[-2], :] = grads[0]
                    grads = grads[1:]
                for k, grad in enumerate(grads):
                    if grad is not None:
                        grad_weights[k] = grad if grad_weights[k] is None else grad_weights[k] + grad
                start += part.shape[-2]
        by_weight = iter(grad_weights)
        return None, None, grad_x, *[next(by_weight) if needed else None for needed in ctx.needs_input_grad[3:]]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


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
