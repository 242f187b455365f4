"""Exact dynamic program for the layer-assignment problem: the test oracle for the MILP.

A state is "peer p starts its stage at layer a" (earlier peers fixed). From there p runs
``[a, b)`` and hands over to some later peer q at layer b, or, if ``b == L``, sends the token back
to the first stage's peer f. The return hop makes the cost depend on f, so the DP runs once per
first peer (vectorised over all f at once). Costs combine with ``max`` (throughput) or ``+``
(latency); both are monotone, so the principle of optimality holds and the DP is exact.

It is O(P^3 L^2) numpy work: fine for tests, not meant for production.
"""

from __future__ import annotations

import time

import numpy as np

from meshllm.plan.problem import Infeasible, PlanProblem, PlanSolution, evaluate, infeasible_reason


def solve_dp(problem: PlanProblem) -> PlanSolution:
    """The optimal plan for *problem*; raises :class:`Infeasible` if no assignment fits."""
    t0 = time.perf_counter()
    compute = _stage_compute(problem)
    value, choice = _backward(problem, compute)
    first = int(np.argmin(np.diagonal(value[:, :, 0])))  # value[f, f, 0]: start at peer f
    if not np.isfinite(value[first, first, 0]):
        raise Infeasible(infeasible_reason(problem))
    stages = _walk(problem, choice, first)
    return evaluate(problem, stages, solve_s=time.perf_counter() - t0)


def _stage_compute(problem: PlanProblem) -> np.ndarray:
    """``c[p, a, b]``: compute seconds of peer p on ``[a, b)``; inf if empty or over memory."""
    n, devices = problem.num_layers, problem.devices
    starts = np.arange(n)[:, None]
    stops = np.arange(n + 1)[None, :]
    byte_sums = np.concatenate([[0], np.cumsum(np.asarray(problem.layer_bytes, dtype=np.int64))])
    need = (
        byte_sums[stops]
        - byte_sums[starts]
        + problem.first_bytes * (starts == 0)
        + problem.last_bytes * (stops == n)
    )
    empty = stops <= starts
    out = np.empty((len(devices), n, n + 1))
    for p, d in enumerate(devices):
        sums = np.concatenate([[0.0], np.cumsum(d.layer_s)])
        c = sums[stops] - sums[starts] + d.first_s * (starts == 0) + d.last_s * (stops == n)
        c[empty | (need > d.memory_bytes)] = np.inf
        out[p] = c
    return out


def _backward(problem: PlanProblem, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best cost-to-go ``value[f, p, a]`` and the move achieving it, for every first peer f.

    Moves out of (p, a) are flattened as: 0 = run ``[a, L)`` and return the token to f;
    ``1 + k*L + b`` = run ``[a, b)`` and hand over to peer ``p + 1 + k`` at layer b.
    """
    n, peers = problem.num_layers, problem.num_devices
    combine = np.maximum if problem.objective == "throughput" else np.add
    link = np.asarray(problem.link_s)
    back = np.asarray(problem.return_s)
    value = np.full((peers, peers, n), np.inf)
    choice = np.zeros((peers, peers, n), dtype=np.int64)
    firsts = np.arange(peers)
    for p in range(peers - 1, -1, -1):
        # the token can only return to a peer at or before p; others never start a path via p
        ret = np.where(firsts <= p, back[p], np.inf)
        moves = [(compute[p, :, n][None, :] + ret[:, None])[:, :, None]]
        for q in range(p + 1, peers):
            stage = compute[p, :, :n] + link[p, q]
            moves.append(combine(stage[None, :, :], value[:, q, None, :]))
        cand = np.concatenate(moves, axis=2)
        choice[:, p, :] = np.argmin(cand, axis=2)
        value[:, p, :] = np.take_along_axis(cand, choice[:, p, :, None], axis=2)[:, :, 0]
    return value, choice


def _walk(problem: PlanProblem, choice: np.ndarray, first: int) -> tuple[tuple[int, int, int], ...]:
    n = problem.num_layers
    stages, p, a = [], first, 0
    while True:
        move = int(choice[first, p, a])
        if move == 0:
            stages.append((p, a, n))
            return tuple(stages)
        q, b = p + 1 + (move - 1) // n, (move - 1) % n
        stages.append((p, a, b))
        p, a = q, b
