"""Freezing on PyTorch's distributed engines: communication and checkpoints.

Whether an engine's settings let freezing work is checked by the freezing mechanism
itself (:mod:`freezesched.freezing`); this package adds what makes freezing *pay* under
them: :func:`register_skip_frozen_hook`, a DDP communication hook that moves no bytes for
frozen parameters, and :func:`save` / :func:`load`, ``torch.distributed.checkpoint``
checkpoints that resume bitwise in any order and can leave untrained weights out.
See ``docs/scaling.md`` for the recipe per engine.
"""

from freezesched.distributed._checkpoint import FORMAT_VERSION, STATE_KEY, fingerprint, load, save
from freezesched.distributed._comm import CommStats, register_skip_frozen_hook, skip_frozen_hook

__all__ = [
    "FORMAT_VERSION",
    "STATE_KEY",
    "CommStats",
    "fingerprint",
    "load",
    "register_skip_frozen_hook",
    "save",
    "skip_frozen_hook",
]
