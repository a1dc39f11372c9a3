"""qlora_kit.tensor_peak: the live-tensor counter that checks the planner on CPU must itself count exactly."""

from __future__ import annotations

import torch

from qlora_kit.tensor_peak import LiveTensorBytes

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
