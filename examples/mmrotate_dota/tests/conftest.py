"""Path set-up for the smoke test: the example's own modules, and a torchvision stand-in
when no real torchvision can be imported (see stubs/torchvision/__init__.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
if importlib.util.find_spec("torchvision") is None:
    sys.path.insert(0, str(HERE / "stubs"))
