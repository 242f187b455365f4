"""The production planner: the layer-assignment problem as a mixed-integer program for HiGHS.

Formulation: one unit of flow circulating through a graph whose nodes are "peer p starts a
stage at layer a" (``S[p, a]``) and "peer p ends a stage at layer b" (``E[p, b]``):

* ``y[p, a, b]`` (binary), ``S[p, a] -> E[p, b]``: peer p runs layers ``[a, b)``. Only ranges
  that fit p's memory get a column, so memory needs no rows at all (and no byte rounding
  against solver tolerances).
* ``h[p, q, b]`` (continuous), ``E[p, b] -> S[q, b]`` for ``q > p``: p hands over to q at layer b,
  costing ``link_s[p][q]``. Only later peers can follow, which is the pipeline order.
* ``r[p, f]`` (continuous), ``E[p, L] -> S[f, 0]`` for ``f <= p``: the sampled token goes back
  from the last stage's peer to the first's, costing ``return_s[p][f]``; this closes the cycle.
* ``z[f]`` (binary): f runs layer 0, i.e. the flow out of ``S[f, 0]``; ``sum(z) == 1``.

An integral flow is exactly one valid plan: every cycle crosses layer 0 once and layer indices
only grow along ranges, and ``h``/``r`` are integral whenever ``y`` is.

``latency`` minimises total cost. Once the first peer is fixed this is a shortest cycle through
one node, whose LP relaxation is integral: so ``y`` stays continuous and only the ``P`` binaries
``z`` need branching. (Without ``z`` a relaxation can mix two plans that swap return hops, each
returning to the other's first peer.) The plain relaxation is solved first and is usually
integral already, which spares HiGHS's MIP machinery altogether.

``throughput`` minimises ``T`` subject to ``T >=`` each peer's stage time, with ``y`` binary.
A mix of plans dilutes those per-peer rows, so ``T >=`` (a lower bound on) the stage time
covering each layer is added too: redundant in integers, far tighter in the relaxation.

Most of the speed comes from what is *not* generated: a quick heuristic finds a good plan, and
ranges that cannot be part of any plan at least as good are dropped before HiGHS sees them.

Times are divided by the start plan's objective so HiGHS's absolute tolerances are relative to
the answer. The chosen ``y`` is priced again by :func:`evaluate`, which is what callers get.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshllm.plan.problem import (
    Device,
    Infeasible,
    PlanProblem,
    PlanSolution,
    evaluate,
    greedy_fill,
    infeasible_reason,
    stop_table,
)
from meshllm.plan.start import Stages, StartSearch

if TYPE_CHECKING:
    # Imported where a plan is solved (about 9 MiB): a peer that never leads never loads it.
    import highspy

_GAP = 1e-7  # relative MIP gap: well inside the 1e-6 the tests hold the DP oracle to
_KEEP = 1e-9  # slack when pruning ranges against the start plan, so its own ranges survive
_RELAXED, _Z_BINARY, _Y_BINARY = 0, 1, 2  # integrality levels, see _solve


def solve_milp(problem: PlanProblem, *, time_limit_s: float = 10.0) -> PlanSolution:
    """The optimal plan for *problem* (the best found, if *time_limit_s* runs out first).

    Raises :class:`Infeasible` if no assignment fits the peers' memory.
    """
    import highspy

    t0 = time.perf_counter()
    fill = greedy_fill(problem)
    if not fill or fill[-1][2] != problem.num_layers:
        # greedy filling is an exact memory-feasibility test, and far cheaper than HiGHS
        raise Infeasible(infeasible_reason(problem))
    start = StartSearch(problem).best(fill)
    model = _Model.build(problem, start)
    highs = _highs(model)
    status, stages = _solve(highs, model, start, deadline=t0 + time_limit_s)
    if status == highspy.HighsModelStatus.kInfeasible:
        # cannot happen after greedy_fill found a plan, unless the model is wrong
        raise RuntimeError("HiGHS calls a problem infeasible that has a feasible plan")
    if stages is None:
        # out of time (or HiGHS gave up) before any better plan: the start plan still stands
        return evaluate(problem, start.stages, solve_s=time.perf_counter() - t0)
    solution = evaluate(problem, stages, solve_s=time.perf_counter() - t0)
    if status == highspy.HighsModelStatus.kOptimal:
        _check_agrees(solution, highs.getInfo().objective_function_value * model.scale)
    return solution


# --- the model --------------------------------------------------------------------------------


@dataclass
class _Model:
    """Columns and rows of the MILP.

    Columns, in order: segments ``y``, hand-overs ``h``, returns ``r``, first-peer binaries
    ``z`` (one per peer), then ``T`` for throughput.
    """

    problem: PlanProblem
    scale: float
    seg: np.ndarray  # (n, 3): p, a, b of each y column
    hop: np.ndarray  # (m, 3): p, q, b of each h column
    back: np.ndarray  # (k, 2): p, f of each r column
    cost: np.ndarray  # scaled stage-time contribution of every y, h and r column
    low: np.ndarray  # scaled lower bound on the whole stage time of each y column
    throughput: bool
    level: int  # which columns are integer: _RELAXED, _Z_BINARY or _Y_BINARY

    @property
    def z0(self) -> int:
        return len(self.cost)

    @property
    def num_cols(self) -> int:
        return self.z0 + self.problem.num_devices + self.throughput

    @classmethod
    def build(cls, problem: PlanProblem, start: PlanSolution) -> _Model:
        seg, compute, low = _segments(problem, start.objective_value)
        hop, back = _links(problem, seg)
        link, ret = np.asarray(problem.link_s), np.asarray(problem.return_s)
        cost = np.concatenate([compute, link[hop[:, 0], hop[:, 1]], ret[back[:, 0], back[:, 1]]])
        scale = start.objective_value or 1.0
        throughput = problem.objective == "throughput"
        level = _Y_BINARY if throughput else _RELAXED
        return cls(problem, scale, seg, hop, back, cost / scale, low / scale, throughput, level)

    def rows(self) -> tuple[np.ndarray, ...]:
        """(row lower, row upper, row index, column index, value) of every nonzero."""
        peers, layers = self.problem.num_devices, self.problem.num_layers
        n, m, k = len(self.seg), len(self.hop), len(self.back)
        ycol, hcol, rcol = np.arange(n), n + np.arange(m), n + m + np.arange(k)
        zcol = self.z0 + np.arange(peers)
        sp, sa, sb = self.seg.T
        hp, hq, hb = self.hop.T
        bp, bf = self.back.T
        # flow conservation, out - in = 0, at S[p, a] (rows p*L + a) and E[p, b] (P*L + p*L + b-1)
        ends = peers * layers - 1
        r = [sp * layers + sa, ends + sp * layers + sb, ends + hp * layers + hb, hq * layers + hb]
        c = [ycol, ycol, hcol, hcol]
        v = [np.ones(n), -np.ones(n), np.ones(m), -np.ones(m)]
        r += [ends + bp * layers + layers, bf * layers]
        c += [rcol, rcol]
        v += [np.ones(k), -np.ones(k)]
        base = 2 * peers * layers
        # z[f] = flow out of S[f, 0], and sum(z) = 1. Without z binary, the relaxation could
        # mix two paths that swap return hops (each returning to the other's first peer).
        first = sa == 0
        r += [base + sp[first], base + np.arange(peers), np.full(peers, base + peers)]
        c += [ycol[first], zcol, zcol]
        v += [np.ones(int(first.sum())), -np.ones(peers), np.ones(peers)]
        base += peers + 1
        lo = [np.zeros(base - 1), np.ones(1)]
        hi = [np.zeros(base - 1), np.ones(1)]
        if self.throughput:
            self._throughput_rows(base, r, c, v, lo, hi)
        return (
            np.concatenate(lo),
            np.concatenate(hi),
            np.concatenate(r),
            np.concatenate(c),
            np.concatenate(v),
        )

    def _throughput_rows(self, base: int, r: list, c: list, v: list, lo: list, hi: list) -> None:
        peers, layers = self.problem.num_devices, self.problem.num_layers
        t = self.num_cols - 1
        sp, sa, sb = self.seg.T
        # T - (stage time of p) >= 0 for every peer p: exact, hops included
        owner = np.concatenate([sp, self.hop[:, 0], self.back[:, 0]])
        r += [base + owner, base + np.arange(peers)]
        c += [np.arange(len(self.cost)), np.full(peers, t)]
        v += [-self.cost, np.ones(peers)]
        # T - (stage time covering layer i) >= 0 for every layer i: redundant in integers, but
        # a mix of plans cannot dilute it the way it dilutes the per-peer rows
        base += peers
        length = sb - sa
        col = np.repeat(np.arange(len(self.seg)), length)
        offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        r += [base + np.repeat(sa, length) + offset, base + np.arange(layers)]
        c += [col, np.full(layers, t)]
        v += [-self.low[col], np.ones(layers)]
        lo += [np.zeros(peers + layers)]
        hi += [np.full(peers + layers, np.inf)]

    def objective(self) -> np.ndarray:
        cost = np.zeros(self.num_cols)
        if self.throughput:
            cost[-1] = 1.0
        else:
            cost[: self.z0] = self.cost
        return cost

    def integrality(self) -> np.ndarray:
        out = np.zeros(self.num_cols, dtype=np.int32)
        out[: len(self.seg)] = self.level >= _Y_BINARY
        out[self.z0 : self.z0 + self.problem.num_devices] = self.level >= _Z_BINARY
        return out

    def upper(self) -> np.ndarray:
        out = np.ones(self.num_cols)
        if self.throughput:
            out[-1] = np.inf
        return out

    def start_solution(self, start: PlanSolution) -> highspy.HighsSolution:
        """The start plan as a full primal vector, so HiGHS begins with an incumbent."""
        import highspy

        values = np.zeros(self.num_cols)
        n, m = len(self.seg), len(self.hop)
        segs = {s: j for j, s in enumerate(map(tuple, self.seg.tolist()))}
        hops = {h: n + j for j, h in enumerate(map(tuple, self.hop.tolist()))}
        backs = {x: n + m + j for j, x in enumerate(map(tuple, self.back.tolist()))}
        stages = start.stages
        for k, stage in enumerate(stages):
            values[segs[stage]] = 1.0
            if k + 1 < len(stages):
                values[hops[(stage[0], stages[k + 1][0], stage[2])]] = 1.0
        values[backs[(stages[-1][0], stages[0][0])]] = 1.0
        values[self.z0 + stages[0][0]] = 1.0
        if self.throughput:
            values[-1] = max(start.stage_s) / self.scale
        solution = highspy.HighsSolution()
        solution.col_value = values.tolist()
        solution.value_valid = True
        return solution

    def stages(self, highs: highspy.Highs) -> Stages | None:
        """The plan in HiGHS's best solution; None if it has none or its ``y`` is fractional."""
        import highspy

        feasible = highspy.SolutionStatus.kSolutionStatusFeasible
        if highs.getInfo().primal_solution_status != int(feasible):
            return None
        y = np.asarray(highs.getSolution().col_value)[: len(self.seg)]
        if np.any(np.abs(y - np.round(y)) > 1e-6):
            return None
        chosen = self.seg[y > 0.5]
        return tuple((int(p), int(a), int(b)) for p, a, b in chosen[np.argsort(chosen[:, 1])])


def _segments(problem: PlanProblem, bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``(p, a, b)`` that fits p's memory and could be a stage of a plan costing <= *bound*.

    Returns the segments, their compute seconds, and a lower bound on their stage time (compute
    plus the cheapest hop out). A range is dropped when its stage alone exceeds *bound* (either
    objective is at least any one stage); when the peers before p cannot cover ``[0, a)`` or
    those after it ``[b, L)`` with such stages; or, for latency, when it plus the fastest
    possible time of the other layers exceeds *bound*.
    """
    layers = problem.num_layers
    upper = bound * (1 + _KEEP) + _KEEP
    a, b = np.meshgrid(np.arange(layers), np.arange(1, layers + 1), indexing="ij")
    stops = stop_table(problem)
    compute = np.stack([_compute(d, a, b, layers) for d in problem.devices])
    fits = (b[None] <= stops[:, :, None]) & (b > a)[None]
    fits &= compute + _cheapest_out(problem)[:, None, None] <= upper
    reach, back = _reach(fits)
    keep = fits.copy()
    for p in range(problem.num_devices):
        keep[p] &= (a <= reach[p]) & (b >= back[p])
    # the hop out can only go to a peer that has a range starting there: charge the cheapest
    low = compute + _cheapest_next(problem, keep)
    keep &= low <= upper
    if problem.objective == "latency":
        keep &= low + _others_s(problem, a, b) <= upper
    p, a_idx, b_idx = np.nonzero(keep)
    seg = np.stack([p, a_idx, b_idx + 1], axis=1)
    return seg, compute[keep], low[keep]


def _compute(d: Device, a: np.ndarray, b: np.ndarray, layers: int) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(d.layer_s)])
    return sums[b] - sums[a] + d.first_s * (a == 0) + d.last_s * (b == layers)


def _cheapest_out(problem: PlanProblem) -> np.ndarray:
    """Per peer, the cheapest hop out of any kind (hand-over or return).

    Charging the same hop whatever the range keeps "this range could fit under the bound" true
    of every sub-range, which :func:`_reach` relies on.
    """
    link, ret = np.asarray(problem.link_s), np.asarray(problem.return_s)
    out = []
    for p in range(problem.num_devices):
        out.append(min(ret[p, : p + 1].min(), link[p, p + 1 :].min(initial=np.inf)))
    return np.asarray(out)


def _cheapest_next(problem: PlanProblem, keep: np.ndarray) -> np.ndarray:
    """``out[p, a, b-1]``: cheapest hop out of p's range ``[a, b)`` to a peer that can follow."""
    peers, layers, _ = keep.shape
    link, ret = np.asarray(problem.link_s), np.asarray(problem.return_s)
    starts_at = keep.any(axis=2)  # [q, b]: q has some range starting at layer b
    out = np.full((peers, layers + 1), np.inf)  # [p, b]
    for p in range(peers):
        later = starts_at[p + 1 :, :]
        if len(later):
            costs = np.where(later, link[p, p + 1 :, None], np.inf)
            out[p, :layers] = costs.min(axis=0)
        firsts = np.flatnonzero(starts_at[: p + 1, 0])
        out[p, layers] = ret[p, firsts].min(initial=np.inf)
    return out[:, None, 1:]


def _reach(fits: np.ndarray) -> tuple[list[int], list[int]]:
    """Per peer p: the furthest layer the peers before p can cover from layer 0, and the
    earliest layer from which the peers after p can cover to the end, using fitting ranges.

    A fitting range still fits when shrunk, so greedily taking the longest range gives the
    reach, and every start up to ``reach[p]`` (every stop from ``back[p]``) is attainable.
    """
    peers, layers, _ = fits.shape
    reach, at = [], 0
    for p in range(peers):
        reach.append(at)
        if at < layers:
            ok = np.flatnonzero(fits[p, at])
            at = max(at, int(ok[-1]) + 1) if len(ok) else at
    back, at = [0] * peers, layers
    for p in range(peers - 1, -1, -1):
        back[p] = at
        if at > 0:
            ok = np.flatnonzero(fits[p, :, at - 1])
            at = min(at, int(ok[0])) if len(ok) else at
    return reach, back


def _others_s(problem: PlanProblem, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``out[p, a, b-1]``: a lower bound on the rest of a latency plan around p's range ``[a, b)``.

    Each other layer at its fastest on any peer before p (for ``[0, a)``) or after p (for
    ``[b, L)``), plus the cheapest hop into p and the cheapest return from a later last peer.
    """
    layers, devices = problem.num_layers, problem.devices
    link, ret = np.asarray(problem.link_s), np.asarray(problem.return_s)
    out = np.empty((len(devices), *a.shape))
    for p in range(len(devices)):
        before, after = devices[:p], devices[p + 1 :]
        head = np.where(a > 0, np.inf, 0.0)  # no peer before p: p must start at layer 0
        if before:
            pre = _fastest_prefix(before)
            into = link[:p, p].min()
            head = np.where(a > 0, pre[a] + min(d.first_s for d in before) + into, 0.0)
        tail = np.where(b < layers, np.inf, 0.0)
        if after:
            suf = _fastest_prefix(after)
            rest = suf[layers] - suf[b] + min(d.last_s for d in after)
            # the last peer is after p; the first is p itself or a peer before p
            home = np.where(a > 0, ret[p + 1 :, :p].min(initial=np.inf), ret[p + 1 :, p].min())
            tail = np.where(b < layers, rest + home, 0.0)
        out[p] = head + tail
    return out


def _fastest_prefix(devices: tuple[Device, ...]) -> np.ndarray:
    fastest = np.min([d.layer_s for d in devices], axis=0)
    return np.concatenate([[0.0], np.cumsum(fastest)])


def _links(problem: PlanProblem, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hand-over ``(p, q, b)`` and return ``(p, f)`` arcs joining a range that ends where another
    begins; arcs with a dead end on either side would only be fixed to zero."""
    peers, layers = problem.num_devices, problem.num_layers
    ends = np.zeros((peers, layers + 1), dtype=bool)
    begins = np.zeros((peers, layers + 1), dtype=bool)
    ends[seg[:, 0], seg[:, 2]] = True
    begins[seg[:, 0], seg[:, 1]] = True
    handover = ends[:, None, :layers] & begins[None, :, :layers]
    handover &= np.triu(np.ones((peers, peers), dtype=bool), k=1)[:, :, None]
    hop = np.stack(np.nonzero(handover), axis=1)
    back = ends[:, None, layers] & begins[None, :, 0] & np.tril(np.ones((peers, peers), dtype=bool))
    return hop, np.stack(np.nonzero(back), axis=1)


# --- HiGHS ------------------------------------------------------------------------------------


def _highs(model: _Model) -> highspy.Highs:
    import highspy

    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("mip_rel_gap", _GAP)
    highs.setOptionValue("mip_abs_gap", _GAP)
    highs.setOptionValue("threads", 1)
    # the model arrives small and pruned, with a start plan: HiGHS's presolve, symmetry
    # detection and feasibility-jump heuristic cost far more time here than they save
    highs.setOptionValue("presolve", "off")
    highs.setOptionValue("mip_heuristic_run_feasibility_jump", False)
    highs.setOptionValue("mip_detect_symmetry", False)
    lo, hi, r, c, v = model.rows()
    used, r = np.unique(r, return_inverse=True)  # drop rows of nodes no arc touches
    lo, hi = lo[used], hi[used]
    order = np.lexsort((c, r))
    ncols = model.num_cols
    highs.passModel(
        ncols,
        len(lo),
        len(r),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMinimize),
        0.0,
        model.objective(),
        np.zeros(ncols),
        model.upper(),
        lo,
        hi,
        np.searchsorted(r[order], np.arange(len(lo))).astype(np.int32),
        c[order].astype(np.int32),
        v[order],
        model.integrality(),
    )
    return highs


def _solve(
    highs: highspy.Highs, model: _Model, start: PlanSolution, *, deadline: float
) -> tuple[highspy.HighsModelStatus, Stages | None]:
    """Run HiGHS, from the weakest integrality that is exact for this model to the strongest.

    Latency starts from the plain relaxation: its optimum is usually a single plan already, and
    then it is optimal for the MILP too, without HiGHS's MIP machinery. If it mixes plans, the
    first peer is made binary (which makes the rest integral); only if HiGHS still returns a
    fractional ``y`` is ``y`` made binary as well. Throughput needs ``y`` binary from the start.
    """
    import highspy

    while True:
        highs.changeColsIntegrality(
            model.num_cols,
            np.arange(model.num_cols, dtype=np.int32),
            model.integrality().astype(np.uint8),
        )
        highs.setSolution(model.start_solution(start))
        highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.0))
        highs.run()
        status = highs.getModelStatus()
        stages = model.stages(highs)
        if stages is not None or status != highspy.HighsModelStatus.kOptimal:
            return status, stages
        if model.level == _Y_BINARY:
            return status, None
        model.level += 1


def _check_agrees(solution: PlanSolution, highs_value: float) -> None:
    """HiGHS's own objective must match the re-evaluated plan; if not, the model is wrong."""
    if not math.isclose(solution.objective_value, highs_value, rel_tol=1e-5, abs_tol=1e-12):
        raise RuntimeError(
            f"MILP objective {highs_value!r} disagrees with the plan's cost "
            f"{solution.objective_value!r}: the model does not match evaluate()"
        )
