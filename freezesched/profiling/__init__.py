"""Measuring what freezing saves: FLOPs executed, memory kept for backward, run records.

:class:`FlopProfiler` counts one step; :class:`FlopAccountant` accounts a training run;
:func:`project_policies` projects schedules without training. All of them produce the
one cost record, :class:`RunCost`, rendered by :func:`render_runs` (policies side by
side), :func:`render_phases` (one run) and :func:`render_modules` (one step, per module).
"""

from freezesched.profiling._accountant import FlopAccountant
from freezesched.profiling._flops import (
    OUTSIDE,
    FlopCount,
    FlopProfiler,
    StepFlops,
    UncountedOpsWarning,
    count_flops,
)
from freezesched.profiling._memory import SavedTensorMeter
from freezesched.profiling._projection import (
    FrozenMiddleWarning,
    State,
    cumulative_flops,
    default_loss,
    measure_policy_costs,
    measure_state_cost,
    project,
    project_policies,
)
from freezesched.profiling._record import Convention, PhaseCost, RunCost, StepCost
from freezesched.profiling._report import (
    Format,
    render_modules,
    render_phases,
    render_runs,
    render_table,
)

__all__ = [
    "OUTSIDE",
    "Convention",
    "FlopAccountant",
    "FlopCount",
    "FlopProfiler",
    "Format",
    "FrozenMiddleWarning",
    "PhaseCost",
    "RunCost",
    "SavedTensorMeter",
    "State",
    "StepCost",
    "StepFlops",
    "UncountedOpsWarning",
    "count_flops",
    "cumulative_flops",
    "default_loss",
    "measure_policy_costs",
    "measure_state_cost",
    "project",
    "project_policies",
    "render_modules",
    "render_phases",
    "render_runs",
    "render_table",
]
