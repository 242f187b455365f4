"""The planner's start plan: a quick, good feasible plan found before HiGHS runs.

It is HiGHS's first incumbent, and its objective is the bound that prunes ranges: no range
that cannot be part of a plan at least as good reaches the solver (see :mod:`meshllm.plan.milp`).
"""

from __future__ import annotations

import bisect
import math

from meshllm.plan.problem import PlanProblem, PlanSolution, evaluate, stop_table

Stages = tuple[tuple[int, int, int], ...]

_BISECT_STEPS = 12  # a start plan within ~0.03% of the best cap for its peers is plenty
_SEARCH_ROUNDS = 3  # rounds of adding/removing one peer in the start-plan search


class StartSearch:
    """A quick, good feasible plan: HiGHS's first incumbent and the bound that prunes ranges.

    For a fixed, ordered set of peers, greedily filling each peer up to a stage-time cap and
    bisecting on the cap balances the stages well. Which peers to use is searched by trying the
    k fastest for every k, then adding or removing one peer at a time while that helps.
    """

    def __init__(self, problem: PlanProblem) -> None:
        self.problem = problem
        self.layers = problem.num_layers
        self.sums = [_prefix(d.layer_s) for d in problem.devices]
        self.stops = stop_table(problem).tolist()
        self.scores: dict[tuple[int, ...], PlanSolution | None] = {}

    def best(self, fill: Stages) -> PlanSolution:
        problem = self.problem
        peers = range(problem.num_devices)
        by_speed = sorted(peers, key=lambda p: self.sums[p][-1])
        for k in range(1, problem.num_devices + 1):
            self.score(tuple(sorted(by_speed[:k])))
        current = self._winner()
        for _ in range(_SEARCH_ROUNDS):
            for p in peers:
                toggled = tuple(sorted(set(current) ^ {p}))
                if toggled:
                    self.score(toggled)
            if self._winner() == current:
                break
            current = self._winner()
        plans = [s for s in self.scores.values() if s is not None]
        plans.append(evaluate(problem, fill))
        return min(plans, key=lambda s: s.objective_value)

    def _winner(self) -> tuple[int, ...]:
        scored = [(s.objective_value, k) for k, s in self.scores.items() if s is not None]
        return min(scored)[1] if scored else tuple(range(self.problem.num_devices))

    def score(self, subset: tuple[int, ...]) -> None:
        """The best plan found for exactly these peers (or fewer, if some take no layer)."""
        if subset in self.scores:
            return
        plan = self.fill(subset, math.inf)
        if plan is None:
            self.scores[subset] = None
            return
        best = evaluate(self.problem, plan)
        lo, hi = 0.0, max(best.stage_s)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            found = self.fill(subset, mid)
            if found is None:
                lo = mid
            else:
                hi, plan = mid, found
        found_best = evaluate(self.problem, plan)
        self.scores[subset] = min(best, found_best, key=lambda s: s.objective_value)

    def fill(self, subset: tuple[int, ...], cap_s: float) -> Stages | None:
        """Each peer of *subset* in turn takes as many layers as fit its memory and *cap_s*.

        The hop out is charged as the link to the next peer of *subset* (or the return hop for
        whoever reaches the last layer). Returns None if the layers run out of peers.
        """
        problem, layers = self.problem, self.layers
        stages: list[tuple[int, int, int]] = []
        start = 0
        for k, p in enumerate(subset):
            d, sums, limit = problem.devices[p], self.sums[p], self.stops[p][start]
            first = stages[0][0] if stages else p
            base = sums[start] - (d.first_s if start == 0 else 0.0)
            finish = sums[layers] - base + d.last_s + problem.return_s[p][first]
            if limit == layers and finish <= cap_s:
                stages.append((p, start, layers))
                return tuple(stages)
            if k + 1 == len(subset):
                return None
            budget = cap_s - problem.link_s[p][subset[k + 1]] + base
            stop = min(bisect.bisect_right(sums, budget) - 1, limit, layers - 1)
            if stop > start:
                stages.append((p, start, stop))
                start = stop
        return None


def _prefix(values: tuple[float, ...]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out
