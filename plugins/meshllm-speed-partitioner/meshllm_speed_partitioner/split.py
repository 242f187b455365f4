"""The speed-proportional split itself, on meshllm's planning problem.

Three steps, each simple enough to check by hand:

1. **Who takes part.** A worker whose memory holds no single layer anywhere in the model is left
   out. If the whole model cannot fit the workers in pipeline order, the same
   :class:`meshllm.plan.Infeasible` error ``lp`` raises says by how much.
2. **Shares.** Each remaining worker's share of the layers is proportional to its speed (the
   inverse of its measured seconds for all layers). A share larger than what the worker's memory
   holds is cut to that, and the excess is shared out again among the others by speed (water
   filling).
3. **Ranges.** One sweep in pipeline order: each worker takes its share, rounded, of the layers
   not yet assigned (shared among it and the workers after it as in step 2), clamped between
   the fewest layers it must take so the workers after it can still hold the rest, and the most
   its memory holds from where it starts. A worker whose share rounds to no layer is left out
   too.

It ignores links and the embedding and lm_head compute extras, which ``lp`` prices; memory
(per-layer weights and KV cache, and both ends' extra weights) is respected exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshllm.model.ranges import LayerRange
from meshllm.plan import Infeasible, PlanProblem, infeasible_reason
from meshllm.plan.problem import greedy_fill, max_stop


def speed_split(problem: PlanProblem) -> list[LayerRange | None]:
    """One entry per device of *problem*, in order: its layer range, or None if left out.

    Raises :class:`meshllm.plan.Infeasible` when no assignment fits the devices' memory.
    """
    n = problem.num_layers
    fill = greedy_fill(problem)
    if not fill or fill[-1][2] != n:
        # Greedy filling in pipeline order is an exact memory-feasibility test.
        raise Infeasible(infeasible_reason(problem))
    capacity = [_most_layers(problem, p) for p in range(problem.num_devices)]
    active = [p for p, c in enumerate(capacity) if c > 0]
    speed = [_speed(problem, p) for p in range(problem.num_devices)]
    out: list[LayerRange | None] = [None] * problem.num_devices
    start = 0
    for k, p in enumerate(active):
        if start == n:
            break
        # Shared again at every step, so a worker clamped below its share (its memory at
        # this end of the model) leaves the difference to all the workers after it.
        rest = active[k:]
        share = _water_fill(n - start, {q: speed[q] for q in rest}, {q: capacity[q] for q in rest})
        most = max_stop(problem, p, start)
        fewest = _fewest_stop(problem, active[k + 1 :], start, most)
        stop = min(max(start + math.floor(share[p] + 0.5), fewest), most)
        if stop > start:
            out[p] = LayerRange(start, stop)
            start = stop
    # The clamps keep "the workers left can hold the layers left" true at every step, and the
    # last worker's lower clamp is the last layer: the sweep always finishes.
    assert start == n, f"speed split stopped at layer {start} of {n}"
    return out


def _speed(problem: PlanProblem, device: int) -> float:
    """Layers per second, as the profile measured them (all workers equal without one)."""
    seconds = math.fsum(problem.devices[device].layer_s)
    return 1.0 / seconds if seconds > 0 else 1.0


def _most_layers(problem: PlanProblem, device: int) -> int:
    """The most layers *device*'s memory holds, wherever in the model they start."""
    return max(max_stop(problem, device, a) - a for a in range(problem.num_layers))


def _water_fill(total: int, speed: dict[int, float], cap: dict[int, int]) -> dict[int, float]:
    """*total* split in proportion to *speed*, no one above its *cap*; the excess of the capped
    goes to the others in proportion to their speed again."""
    share: dict[int, float] = {}
    free = dict(speed)
    left = float(total)
    while free:
        scale = left / math.fsum(free.values())
        over = [p for p, s in free.items() if s * scale > cap[p]]
        if not over:
            share.update({p: s * scale for p, s in free.items()})
            break
        for p in over:
            share[p] = float(cap[p])
            left -= cap[p]
            del free[p]
    return share


def _fewest_stop(problem: PlanProblem, rest: Sequence[int], start: int, most: int) -> int:
    """The smallest stop (from *start*, at most *most*) after which the devices in *rest* can
    still hold every remaining layer, each taking as many as its memory allows in turn."""
    for stop in range(start, most + 1):
        if _covers(problem, rest, stop):
            return stop
    return most  # unreachable while the model fits (checked first); keeps the sweep total


def _covers(problem: PlanProblem, devices: Sequence[int], start: int) -> bool:
    for p in devices:
        if start == problem.num_layers:
            break
        start = max(start, max_stop(problem, p, start))
    return start == problem.num_layers
