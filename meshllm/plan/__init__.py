"""Planning: which peer runs which contiguous range of layers.

:func:`solve_milp` is the planner (a mixed-integer program solved by HiGHS); :func:`solve_dp` is
an exact dynamic program kept as its test oracle. Both price plans with :func:`evaluate`.
"""

from meshllm.plan.dp import solve_dp
from meshllm.plan.milp import solve_milp
from meshllm.plan.problem import (
    BadPlanProblem,
    Device,
    Infeasible,
    PlanProblem,
    PlanSolution,
    evaluate,
    infeasible_reason,
)

__all__ = [
    "BadPlanProblem",
    "Device",
    "Infeasible",
    "PlanProblem",
    "PlanSolution",
    "evaluate",
    "infeasible_reason",
    "solve_dp",
    "solve_milp",
]
