"""qlora_kit.plan.tensor_peak: the live-tensor counter that checks the planner on CPU must itself count exactly."""

from __future__ import annotations

import torch

from qlora_kit.plan.tensor_peak import LiveTensorBytes, NoArithmetic

MIB = 1024**2


def test_counts_each_storage_once_and_forgets_freed_ones():
    with LiveTensorBytes("cpu") as counter:
        a = torch.ones(MIB // 4)                # 1 MiB of float32
        view = a[: MIB // 8]                    # a view: no new memory
        b = a * 2                               # 1 MiB more: peak 2 MiB
        del b
        c = torch.zeros(MIB // 2, dtype=torch.int8)  # 0.5 MiB after b was freed: still 1.5 < 2
    assert counter.peak_bytes == 2 * MIB
    assert counter.current_bytes == MIB + MIB // 2
    del a, view, c
    assert counter.current_bytes == 0


def test_tensors_made_before_are_counted_only_when_passed_in():
    model = torch.nn.Linear(256, 256)  # 256 x 256 + 256 float32
    counter = LiveTensorBytes("cpu", model)
    assert counter.start_bytes == (256 * 256 + 256) * 4
    with counter:
        model(torch.ones(4, 256)).sum().backward()
    grads = (256 * 256 + 256) * 4
    assert counter.current_bytes >= counter.start_bytes + grads  # the gradients now live on
    assert set(counter.phase_peaks) == {"forward", "backward"}


def test_in_place_resize_changes_the_count():
    with LiveTensorBytes("cpu") as counter:
        a = torch.empty(0)
        a.resize_(MIB // 4)
    assert counter.current_bytes == MIB
    del a


def _attention_step(dtype):
    """A layer's worth of products: linear, SDPA (the CPU flash kernel), an out= product into a buffer, backward."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64))
    x = torch.randn(2, 33, 64)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        q = torch.nn.functional.linear(x, weight).view(2, 33, 3, 32).permute(2, 0, 1, 3)
        attended = torch.nn.functional.scaled_dot_product_attention(q[0][:, None], q[1][:, None], q[2][:, None],
                                                                    is_causal=True)
        buffer = torch.empty(66, 16)
        torch.mm(attended.detach().reshape(66, 32).float(), torch.ones(32, 16), out=buffer)
    (attended.float().sum() + buffer.sum() * 0).backward()
    return weight.grad


def test_no_arithmetic_counts_exactly_what_the_arithmetic_allocates():
    for dtype in (torch.float32, torch.bfloat16):
        with LiveTensorBytes("cpu") as real:
            computed = _attention_step(dtype)
        with LiveTensorBytes("cpu") as counted, NoArithmetic() as skipping:
            zeros = _attention_step(dtype)
        assert (counted.peak_bytes, counted.phase_peaks) == (real.peak_bytes, real.phase_peaks), dtype
        assert skipping.skipped >= 4 and zeros.shape == computed.shape and not zeros.any() and computed.any()
