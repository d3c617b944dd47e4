"""Measuring what freezing saves: FLOPs executed, memory kept for backward, run records.

:class:`FlopProfiler` counts one step; :class:`FlopAccountant` accounts a training run;
:func:`project_policies` projects schedules without training; :func:`plan_memory` plans the
memory per rank of every freeze state before a run. The cost measurements produce the
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
from freezesched.profiling._memory import PeakMemoryMeter, SavedTensorMeter
from freezesched.profiling._plan import OptimizerKind, Precision, Sharding, StepImpl, plan_memory
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
from freezesched.profiling._record import (
    Convention,
    MemoryPhase,
    MemoryPlan,
    PhaseCost,
    RunCost,
    StepCost,
)
from freezesched.profiling._report import (
    Format,
    render_memory,
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
    "MemoryPhase",
    "MemoryPlan",
    "OptimizerKind",
    "PeakMemoryMeter",
    "PhaseCost",
    "Precision",
    "RunCost",
    "SavedTensorMeter",
    "Sharding",
    "State",
    "StepCost",
    "StepFlops",
    "StepImpl",
    "UncountedOpsWarning",
    "count_flops",
    "cumulative_flops",
    "default_loss",
    "measure_policy_costs",
    "measure_state_cost",
    "plan_memory",
    "project",
    "project_policies",
    "render_memory",
    "render_modules",
    "render_phases",
    "render_runs",
    "render_table",
]
