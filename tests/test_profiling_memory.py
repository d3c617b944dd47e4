"""SavedTensorMeter: exact byte counts worked out by hand."""

from __future__ import annotations

import torch

from freezesched.profiling import SavedTensorMeter


def test_linear_saves_only_what_its_gradients_need():
    layer = torch.nn.Linear(16, 4, bias=False)
    x = torch.randn(8, 16)
    with SavedTensorMeter() as meter:
        layer(x)  # weight grad needs the input only: 8 * 16 float32
    assert (meter.bytes, meter.tensors) == (512, 1)
    x.requires_grad_(True)
    with SavedTensorMeter() as meter:
        layer(x)  # input grad needs the weight too: + 4 * 16 float32
    assert meter.bytes == 512 + 256


def test_each_storage_is_counted_once():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter:
        (a * b).sum()
        (a * b).sum()  # the same two storages saved again
    assert (meter.bytes, meter.tensors) == (80, 4)


def test_nothing_is_saved_without_grad_and_hooks_are_removed():
    a = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter, torch.no_grad():
        (a * a).sum()
    assert meter.bytes == 0
    outer = SavedTensorMeter()
    with outer:
        pass
    (a * a).sum()
    assert outer.bytes == 0
