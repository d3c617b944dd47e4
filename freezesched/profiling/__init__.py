"""Measuring what freezing saves: FLOPs executed, memory kept for backward, accounting."""

from freezesched.profiling._accounting import (
    PolicyCost,
    StateCost,
    cumulative_flops,
    default_loss,
    measure_policy_costs,
    measure_state_cost,
    policy_table,
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
from freezesched.profiling._report import Format, render_table
from freezesched.profiling._run import FlopAccountant, RunTotals, StateStats, run_table

__all__ = [
    "FlopAccountant",
    "FlopCount",
    "FlopProfiler",
    "Format",
    "PolicyCost",
    "RunTotals",
    "SavedTensorMeter",
    "StateCost",
    "StateStats",
    "StepFlops",
    "UncountedOpsWarning",
    "count_flops",
    "cumulative_flops",
    "default_loss",
    "measure_policy_costs",
    "measure_state_cost",
    "policy_table",
    "project",
    "project_policies",
    "render_table",
    "run_table",
]
