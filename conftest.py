"""Doctest collection: the optional integrations whose framework is not installed are skipped.

``freezesched/integrations/peft.py`` and ``timm.py`` import their framework at import time;
in an environment without it (the main CI venv has no timm, whose torchvision must match
torch) their doctests run in the environment that has it (``scripts/other_torch.sh newest``).
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    f"freezesched/integrations/{name}.py"
    for name in ("peft", "timm")
    if importlib.util.find_spec(name) is None
]
