"""The layer-assignment solvers: the MILP (production) against the exact DP (oracle).

The DP is itself checked against brute-force enumeration on small instances; the MILP is then
held to the DP's optimum on a few hundred seeded random instances of up to 64 layers and 8 peers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from meshllm.errors import MeshError
from meshllm.plan import (
    BadPlanProblem,
    Device,
    Infeasible,
    PlanProblem,
    PlanSolution,
    evaluate,
    solve_dp,
    solve_milp,
)

MIB = 2**20
MS = 1e-3

# --- helpers ----------------------------------------------------------------------------------


def uniform_problem(
    layers: int,
    speeds: list[float],
    *,
    memory: list[int] | None = None,
    layer_bytes: int = MIB,
    link: float = 0.0,
    objective: str = "throughput",
) -> PlanProblem:
    """Peers whose every layer takes ``speed`` ms; links all cost *link* seconds."""
    peers = len(speeds)
    memory = memory or [layers * layer_bytes] * peers
    devices = tuple(
        Device(f"d{p}", (speeds[p] * MS,) * layers, 0.0, 0.0, memory[p]) for p in range(peers)
    )
    hops = tuple(tuple(0.0 if i == j else link for j in range(peers)) for i in range(peers))
    return PlanProblem((layer_bytes,) * layers, 0, 0, devices, hops, hops, objective)


def random_problem(
    rng: random.Random, *, layers: int | None = None, peers: int | None = None
) -> PlanProblem:
    """A random instance mixing the regimes that matter: fast and very slow peers (which the
    optimum should drop), identical peers (many ties), tight and loose memory (sometimes
    infeasible on purpose, sometimes fitting exactly), cheap and dear, symmetric and lopsided
    links, and times from microseconds to seconds."""
    layers = layers or rng.randint(1, 64)
    peers = peers or rng.randint(1, 8)
    layer_bytes = tuple(rng.randint(20 * MIB, 60 * MIB) for _ in range(layers))
    first_bytes, last_bytes = rng.randint(0, 80 * MIB), rng.randint(0, 80 * MIB)
    total = sum(layer_bytes) + first_bytes + last_bytes
    # memory pressure: below 1 is infeasible; at 8 most peers could hold the whole model
    pressure = rng.choice([0.7, 1.6, 2.5, 4.0, 8.0])
    unit = MS * rng.choice([1e-3, 1.0, 1.0, 1.0, 1e3])
    identical = rng.random() < 0.15
    devices = []
    for p in range(peers):
        speed = 1.0 if identical else rng.choice([1.0, 1.0, 1.5, 3.0, 12.0])
        jitter = 0.0 if identical else rng.uniform(0.0, 0.3)
        layer_s = tuple(speed * unit * rng.uniform(1 - jitter, 1 + jitter) for _ in range(layers))
        share = rng.uniform(0.2, 1.5) * pressure / peers
        cap = int(total * min(share, 1.2))
        if rng.random() < 0.2:  # exactly enough for some range: tests the <= edge
            a = rng.randrange(layers)
            b = rng.randint(a + 1, layers)
            cap = sum(layer_bytes[a:b]) + (first_bytes if a == 0 else 0)
            cap += last_bytes if b == layers else 0
        first_s, last_s = rng.uniform(0, 2 * unit), rng.uniform(0, 8 * unit)
        devices.append(Device(f"peer{p}", layer_s, first_s, last_s, cap))
    link_scale = unit * rng.choice([0.0, 0.2, 2.0, 10.0])
    link = _hops(rng, peers, link_scale)
    ret = link if rng.random() < 0.5 else _hops(rng, peers, link_scale)
    objective = rng.choice(["throughput", "latency"])
    return PlanProblem(layer_bytes, first_bytes, last_bytes, tuple(devices), link, ret, objective)


def _hops(rng: random.Random, peers: int, scale: float) -> tuple[tuple[float, ...], ...]:
    return tuple(
        tuple(0.0 if i == j else scale * rng.uniform(0.2, 1.0) for j in range(peers))
        for i in range(peers)
    )


def with_objective(problem: PlanProblem, objective: str) -> PlanProblem:
    return dataclasses.replace(problem, objective=objective)


def brute_force(problem: PlanProblem) -> PlanSolution | None:
    """Every subsequence of peers times every way to cut the layers: the definition itself."""
    layers, peers = problem.num_layers, problem.num_devices
    best = None
    for k in range(1, min(layers, peers) + 1):
        for used in itertools.combinations(range(peers), k):
            for cuts in itertools.combinations(range(1, layers), k - 1):
                bounds = (0, *cuts, layers)
                stages = tuple((used[j], bounds[j], bounds[j + 1]) for j in range(k))
                try:
                    s = evaluate(problem, stages)
                except BadPlanProblem:
                    continue  # over some peer's memory
                if best is None or s.objective_value < best.objective_value:
                    best = s
    return best


def assert_consistent(problem: PlanProblem, solution: PlanSolution) -> None:
    """The reported numbers are exactly evaluate()'s for the reported (valid) stages."""
    again = evaluate(problem, solution.stages)  # raises if memory, contiguity or order is off
    assert again.objective_value == solution.objective_value
    assert again.stage_s == solution.stage_s
    assert again.step_s == solution.step_s
    assert solution.solve_s >= 0.0


def solve_both(problem: PlanProblem) -> tuple[PlanSolution | None, PlanSolution | None]:
    results = []
    for solve in (solve_dp, solve_milp):
        try:
            results.append(solve(problem))
        except Infeasible as e:
            assert "MiB" in str(e)
            results.append(None)
    return results[0], results[1]


# --- random instances: MILP == DP, DP == brute force -----------------------------------------


def check_against_dp(base: PlanProblem) -> None:
    for objective in ("throughput", "latency"):
        problem = with_objective(base, objective)
        dp, milp = solve_both(problem)
        assert (dp is None) == (milp is None), f"only one solver found {problem} infeasible"
        if dp is None or milp is None:
            continue
        assert_consistent(problem, dp)
        assert_consistent(problem, milp)
        assert math.isclose(milp.objective_value, dp.objective_value, rel_tol=1e-6), (
            objective,
            milp.stages,
            dp.stages,
        )


@pytest.mark.parametrize("seed", range(240))
def test_milp_matches_dp_on_random_instances(seed):
    check_against_dp(random_problem(random.Random(seed)))


@pytest.mark.parametrize("seed", range(40))
def test_milp_matches_dp_at_full_size(seed):
    check_against_dp(random_problem(random.Random(5_000 + seed), layers=64, peers=8))


def test_random_instances_cover_the_interesting_cases():
    """The generator really produces infeasible instances and optima that drop peers."""
    infeasible = dropped = 0
    for seed in range(240):
        problem = random_problem(random.Random(seed))
        try:
            s = solve_dp(with_objective(problem, "throughput"))
        except Infeasible:
            infeasible += 1
            continue
        dropped += len(s.stages) < min(problem.num_devices, problem.num_layers)
    assert infeasible >= 30
    assert dropped >= 30


@pytest.mark.parametrize("seed", range(120))
def test_dp_matches_brute_force_on_small_instances(seed):
    rng = random.Random(10_000 + seed)
    base = random_problem(rng, layers=rng.randint(1, 7), peers=rng.randint(1, 4))
    for objective in ("throughput", "latency"):
        problem = with_objective(base, objective)
        expected = brute_force(problem)
        dp, milp = solve_both(problem)
        if expected is None:
            assert dp is None and milp is None
            continue
        assert dp is not None and milp is not None
        assert math.isclose(dp.objective_value, expected.objective_value, rel_tol=1e-9)
        assert math.isclose(milp.objective_value, expected.objective_value, rel_tol=1e-6)


# --- hand-made cases with known answers ---------------------------------------------------------


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_one_device_runs_everything(solve, objective):
    problem = uniform_problem(10, [2.0], objective=objective)
    s = solve(problem)
    assert s.stages == ((0, 0, 10),)
    assert s.objective_value == pytest.approx(20 * MS)
    assert s.step_s == pytest.approx(20 * MS)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_two_identical_devices_split_evenly_for_throughput(solve):
    s = solve(uniform_problem(12, [1.0, 1.0], link=0.1 * MS))
    assert s.stages == ((0, 0, 6), (1, 6, 12))
    assert s.stage_s == pytest.approx((6.1 * MS, 6.1 * MS))
    assert s.objective_value == pytest.approx(6.1 * MS)
    assert s.step_s == pytest.approx(12.2 * MS)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_a_very_slow_device_is_left_out(solve):
    s = solve(uniform_problem(12, [1.0, 20.0, 1.0], link=0.1 * MS))
    assert s.stages == ((0, 0, 6), (2, 6, 12))


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_latency_puts_everything_on_the_fastest_device_that_fits(solve):
    layers = 16
    problem = uniform_problem(
        layers,
        [1.0, 0.5, 0.25, 2.0],
        memory=[layers * MIB, layers * MIB, (layers - 1) * MIB, layers * MIB],
        link=5 * MS,
        objective="latency",
    )
    s = solve(problem)
    assert s.stages == ((1, 0, layers),)  # device 2 is faster but cannot hold the model
    assert s.objective_value == pytest.approx(layers * 0.5 * MS)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_latency_fills_the_fast_device_and_spills_to_the_next(solve):
    problem = uniform_problem(
        10, [3.0, 1.0, 2.0], memory=[10 * MIB, 7 * MIB, 10 * MIB], objective="latency"
    )
    s = solve(problem)
    # the fast peer takes all it can hold; the rest goes to the faster of the other two
    assert s.stages == ((1, 0, 7), (2, 7, 10))
    assert s.objective_value == pytest.approx(13 * MS)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_the_return_hop_counts(solve):
    # splitting k/8-k costs max(k, 8-k+9) ms with the token's 9 ms way back: alone is 8 ms
    problem = uniform_problem(8, [1.0, 1.0])
    far = ((0.0, 0.0), (9 * MS, 0.0))
    problem = dataclasses.replace(problem, return_s=far)
    s = solve(problem)
    assert len(s.stages) == 1
    assert s.objective_value == pytest.approx(8 * MS)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_memory_fits_exactly_at_the_cap(solve):
    problem = uniform_problem(6, [1.0, 1.0], memory=[3 * MIB, 3 * MIB])
    assert solve(problem).stages == ((0, 0, 3), (1, 3, 6))
    tight = uniform_problem(6, [1.0, 1.0], memory=[3 * MIB, 3 * MIB - 1])
    with pytest.raises(Infeasible):
        solve(tight)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_first_and_last_extras_count_for_whoever_runs_the_ends(solve):
    base = uniform_problem(4, [1.0, 1.0])
    devices = tuple(dataclasses.replace(d, first_s=10 * MS) for d in base.devices)
    devices = (devices[0], dataclasses.replace(devices[1], first_s=0.0, last_s=3 * MS))
    problem = dataclasses.replace(base, devices=devices, objective="latency")
    s = solve(problem)
    # whoever runs layer 0 pays 10 ms, so device 1 does it all: 4 + 3 ms
    assert s.stages == ((1, 0, 4),)
    assert s.objective_value == pytest.approx(7 * MS)


# --- infeasibility messages ------------------------------------------------------------------


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_not_enough_memory_in_all(solve):
    problem = uniform_problem(10, [1.0, 1.0], memory=[4 * MIB, 5 * MIB])
    with pytest.raises(Infeasible, match=r"needs 10\.0 MiB but the peers offer 9\.0 MiB in all"):
        solve(problem)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_one_layer_too_big_for_every_peer(solve):
    problem = dataclasses.replace(
        uniform_problem(4, [1.0, 1.0], memory=[64 * MIB, 64 * MIB]),
        layer_bytes=(MIB, MIB, 80 * MIB, MIB),
    )
    with pytest.raises(Infeasible, match=r"layer 2 alone needs 80\.0 MiB.*offers 64\.0 MiB"):
        solve(problem)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_contiguity_wastes_memory(solve):
    # 2 + 2 MiB offered for 4 MiB of layers, but the 2 MiB layer in the middle breaks every split
    problem = dataclasses.replace(
        uniform_problem(3, [1.0, 1.0], memory=[2 * MIB, 2 * MIB]),
        layer_bytes=(MIB, 2 * MIB, MIB),
    )
    message = r"no contiguous assignment fits: .* layers 0-1 of 3, leaving layer 2 \(1\.0 MiB\)"
    with pytest.raises(Infeasible, match=message):
        solve(problem)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
def test_a_shortfall_of_one_byte_is_shown_in_bytes(solve):
    problem = uniform_problem(6, [1.0, 1.0], memory=[3 * MIB, 3 * MIB - 1])
    with pytest.raises(Infeasible, match=r"6291456 bytes\) but the peers offer .*6291455 bytes"):
        solve(problem)


@pytest.mark.parametrize("solve", [solve_dp, solve_milp])
@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_free_layers_and_links_cost_nothing(solve, objective):
    s = solve(uniform_problem(8, [0.0, 0.0, 0.0], objective=objective))
    assert s.objective_value == 0.0
    assert s.step_s == 0.0


def test_infeasible_is_a_mesh_error():
    assert issubclass(Infeasible, MeshError)
    assert issubclass(BadPlanProblem, MeshError)


# --- validation --------------------------------------------------------------------------------


def test_problem_validation_names_the_problem():
    good = uniform_problem(3, [1.0, 1.0])
    d0, d1 = good.devices
    cases = [
        ({"layer_bytes": ()}, "at least one layer"),
        ({"devices": ()}, "at least one candidate device"),
        ({"objective": "speed"}, "unknown objective"),
        ({"layer_bytes": (1, -1, 1)}, "non-negative integers"),
        ({"layer_bytes": (1, 1.5, 1)}, "non-negative integers"),
        ({"devices": (d0, dataclasses.replace(d1, name="d0"))}, "unique"),
        ({"devices": (d0, dataclasses.replace(d1, layer_s=(1.0,)))}, "1 layer times for 3"),
        ({"link_s": ((0.0, 1.0),)}, "2x2"),
        ({"return_s": ((1.0, 0.0), (0.0, 0.0))}, r"return_s\[0\]\[0\] must be 0"),
        ({"link_s": ((0.0, -1.0), (0.0, 0.0))}, "finite and non-negative"),
        ({"link_s": ((0.0, math.inf), (0.0, 0.0))}, "finite and non-negative"),
    ]
    for change, message in cases:
        with pytest.raises(BadPlanProblem, match=message):
            dataclasses.replace(good, **change)
    with pytest.raises(BadPlanProblem, match="non-negative"):
        Device("x", (-1.0,), 0.0, 0.0, 1)
    with pytest.raises(BadPlanProblem, match="memory_bytes"):
        Device("x", (1.0,), 0.0, 0.0, -1)


def test_evaluate_rejects_invalid_stages():
    problem = uniform_problem(6, [1.0, 1.0, 1.0], memory=[6 * MIB, 6 * MIB, 2 * MIB])
    bad = [
        (),
        ((0, 0, 3), (1, 4, 6)),  # gap
        ((0, 0, 4), (1, 3, 6)),  # overlap
        ((0, 0, 3),),  # short
        ((1, 0, 3), (0, 3, 6)),  # out of pipeline order
        ((0, 0, 3), (0, 3, 6)),  # the same device twice
        ((0, 0, 2), (2, 2, 6)),  # over device 2's memory
        ((0, 0, 3), (3, 3, 6)),  # no such device
    ]
    for stages in bad:
        with pytest.raises(BadPlanProblem):
            evaluate(problem, stages)
    assert evaluate(problem, ((0, 0, 2), (1, 2, 6))).stages == ((0, 0, 2), (1, 2, 6))


def test_evaluate_prices_hops_and_the_return():
    problem = uniform_problem(4, [1.0, 2.0])
    link = ((0.0, 0.5 * MS), (0.0, 0.0))
    back = ((0.0, 0.0), (0.25 * MS, 0.0))
    problem = dataclasses.replace(problem, link_s=link, return_s=back)
    s = evaluate(problem, ((0, 0, 1), (1, 1, 4)))
    assert s.stage_s == pytest.approx((1.5 * MS, 6.25 * MS))
    assert s.objective_value == pytest.approx(6.25 * MS)
    assert s.step_s == pytest.approx(7.75 * MS)
    latency = evaluate(dataclasses.replace(problem, objective="latency"), s.stages)
    assert latency.objective_value == pytest.approx(7.75 * MS)


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_milp_out_of_time_still_returns_a_valid_plan(objective):
    speeds = [1.0, 1.3, 0.8, 2.0, 1.1, 0.9, 1.7, 1.2]
    problem = uniform_problem(64, speeds, memory=[20 * MIB] * 8, link=0.3 * MS, objective=objective)
    assert_consistent(problem, solve_milp(problem, time_limit_s=0.0))
