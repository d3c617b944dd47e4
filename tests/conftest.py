"""The restore invariant, asserted after every test: freezesched holds nothing, and every
parameter it ever froze has the ``requires_grad`` it had before, with nothing of ours left
on any module it touched."""

from __future__ import annotations

import gc
import signal
import weakref

import pytest
import torch

from freezesched.freezing import _fast, _mechanism


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "changes_flags: the test itself sets requires_grad after a freeze ended"
    )


@pytest.fixture(autouse=True)
def _restore_invariant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    # Strong references (for the test's duration): a weak one would itself stop
    # torch.utils.swap_tensors, which tests check freezesched never does.
    original_flags: dict[int, tuple[torch.Tensor, bool]] = {}
    touched: list[weakref.ref[torch.nn.Module]] = []
    acquire = _mechanism.Hold.acquire

    def recording_acquire(self: _mechanism.Hold) -> None:
        for param in self.plan.params:
            if id(param) not in original_flags and not _mechanism.is_frozen(param):
                original_flags[id(param)] = (param, param.requires_grad)
        touched.extend(weakref.ref(m) for m, _, _ in self.plan.watch)
        touched.append(weakref.ref(self.plan.module))
        acquire(self)

    monkeypatch.setattr(_mechanism.Hold, "acquire", recording_acquire)
    handler = signal.getsignal(signal.SIGINT)
    entries = set(_fast._ENTRIES)
    yield
    monkeypatch.undo()
    assert not _mechanism._PARAMS, "a parameter is still held frozen after the test"
    assert not _mechanism._WATCH, "a module is still watched after the test"
    assert not _mechanism._CALLS and not _mechanism._STATIC, "a per-call pin was left open"
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    assert _mechanism._HOOK_KEY not in hooks, "the global forward hooks are still installed"
    assert _mechanism._DEPTH == [0] and not _mechanism._PENDING and not _mechanism._PREVIOUS
    assert signal.getsignal(signal.SIGINT) is handler, "the SIGINT handler was not restored"
    if request.node.get_closest_marker("changes_flags") is None:
        for param, flag in original_flags.values():
            assert param.requires_grad is flag, "a parameter's requires_grad was not restored"
    for ref in touched:
        module = ref()
        if module is not None:
            left = [k for k in vars(module) if "freezesched" in k]
            left += [k for k in ("forward", "__getstate__") if _fast.is_ours(vars(module).get(k))]
            assert not left, f"freezesched left {left} on a {type(module).__name__}"
    if set(_fast._ENTRIES) - entries:  # fast twins are kept per module, while it lives
        gc.collect()
        left = set(_fast._ENTRIES) - entries
        assert not left, "a fast twin outlived its module (or drop_fast was not called)"
