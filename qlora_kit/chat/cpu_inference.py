"""Generation on a CPU with the 4-bit base: dequantize each weight once, not once per token.

bitsandbytes' 4-bit layers dequantize their whole weight on every forward pass. In training that is one pass per
micro-batch of hundreds of tokens; in generation it is one pass per new token, and on a CPU dequantizing
SmolLM2-135M's 210 weights takes 0.2-0.4 s, so replies came at a few tokens per second. (Its CPU inference kernel
needs AVX512-BF16 and repacks the weights so they can no longer train: qlora_kit.model.loading turns it off.)

`dequantized_weights(model)` keeps each layer's dequantized weight for the duration of a `with` block, in the
compute dtype, and runs the layer as a plain linear map with it: the same values bitsandbytes computes each time,
so the same logits. Only on a CPU, and only when the weights fit comfortably in free RAM (float32: 4 bytes a
parameter); otherwise nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

RAM_SHARE = 0.5
"""The dequantized weights may take at most this share of the RAM that is free."""


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@contextlib.contextmanager
def dequantized_weights(model) -> Iterator[bool]:
    """Within the block, every CPU 4-bit layer computes with a weight dequantized once. Yields whether it did."""
    import psutil

    layers = [m for m in four_bit_layers(model) if m.weight.device.type == "cpu"]
    dtype = next((m.compute_dtype for m in layers if m.compute_dtype is not None), torch.float32)
    needed = sum(m.weight.quant_state.shape.numel() for m in layers) * torch.finfo(dtype).bits // 8
    if not layers or needed > RAM_SHARE * psutil.virtual_memory().available:
        yield False
        return
    import bitsandbytes.functional as F

    try:
        for layer in layers:
            weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            layer.forward = _plain_linear(layer, weight)
        yield True
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's own forward


def _plain_linear(layer, weight: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = layer.bias.to(weight.dtype) if layer.bias is not None else None
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward
