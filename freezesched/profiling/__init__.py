"""Measuring what freezing saves: memory kept for backward (FLOPs and time to follow)."""

from freezesched.profiling._memory import SavedTensorMeter

__all__ = ["SavedTensorMeter"]
