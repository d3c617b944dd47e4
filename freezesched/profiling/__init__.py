"""Measuring what freezing saves: FLOPs executed, memory kept for backward, accounting."""

from freezesched.profiling._accounting import (
    PolicyCost,
    StateCost,
    default_loss,
    measure_state_cost,
    project,
    project_policies,
)
from freezesched.profiling._flops import (
    FlopCount,
    FlopProfiler,
    StepFlops,
    UncountedOpsWarning,
    count_flops,
)
from freezesched.profiling._memory import SavedTensorMeter

__all__ = [
    "FlopCount",
    "FlopProfiler",
    "PolicyCost",
    "SavedTensorMeter",
    "StateCost",
    "StepFlops",
    "UncountedOpsWarning",
    "count_flops",
    "default_loss",
    "measure_state_cost",
    "project",
    "project_policies",
]
