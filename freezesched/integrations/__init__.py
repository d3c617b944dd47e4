"""Framework integrations: each translates a trainer's clock into ticks for the controller.

Every integration is its own module and imports its framework at import time, so
``import freezesched`` never needs one. Install the matching extra:

- :mod:`freezesched.integrations.mmengine`: ``pip install freezesched[mmengine]``
  (MMEngine / MMDetection 3.x / MMRotate 1.x, configured from a config file alone);
- :mod:`freezesched.integrations.lightning`: ``pip install freezesched[lightning]``;
- :mod:`freezesched.integrations.hf`: ``pip install freezesched[hf]`` (Transformers).

All of them are thin: they build a :class:`~freezesched.FreezeController`, call
``apply(tick)`` with the framework's epoch or step, and save its state in the
framework's checkpoint so a resumed run makes the same decisions (and the same optimizer
state resets) as an uninterrupted one.
"""
