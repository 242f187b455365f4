"""The built-in partitioners (lp, even, memory) and how the registry checks their answers."""

from __future__ import annotations

import pytest

from meshllm.model.ranges import LayerRange
from meshllm.partitioners import (
    PartitionRequest,
    WorkerProfile,
    build_problem,
    proportional_ranges,
)
from meshllm.plan import Infeasible, evaluate, solve_dp
from meshllm.plugins import PartitionerRegistry, get_plugin_manager

MiB = 1 << 20


@pytest.fixture(scope="module")
def registry() -> PartitionerRegistry:
    return PartitionerRegistry(get_plugin_manager(load_entry_points=False))


def worker(name: str, layer_ms: float, memory_mib: int, layers: int = 30) -> WorkerProfile:
    return WorkerProfile(
        name=name, memory_bytes=memory_mib * MiB, layer_s=(layer_ms / 1e3,) * layers, last_s=0.005
    )


def request(workers, objective="throughput", layers=30, hop=0.001) -> PartitionRequest:
    w = len(workers)
    links = tuple(tuple(0.0 if i == j else hop for j in range(w)) for i in range(w))
    return PartitionRequest(
        num_layers=layers,
        num_workers=w,
        layer_bytes=(14 * MiB,) * layers,
        first_bytes=100 * MiB,
        last_bytes=100 * MiB,
        workers=tuple(workers),
        link_s=links,
        return_s=links,
        objective=objective,
    )


def test_builtins_are_registered(registry):
    assert {"lp", "even", "memory"} <= set(registry.names())


def test_even_uses_every_worker_equally(registry):
    out = registry.assign("even", PartitionRequest(num_layers=30, num_workers=4))
    assert [len(r) for r in out] == [8, 8, 7, 7]


def test_even_leaves_out_workers_beyond_the_layer_count(registry):
    out = registry.assign("even", PartitionRequest(num_layers=3, num_workers=5))
    assert out[3:] == [None, None] and [len(r) for r in out[:3]] == [1, 1, 1]


def test_memory_split_follows_memory(registry):
    ws = [worker("a", 1, 800), worker("b", 1, 400), worker("c", 1, 200)]
    out = registry.assign("memory", request(ws))
    sizes = [len(r) for r in out]
    assert sum(sizes) == 30 and sizes[0] > sizes[1] > sizes[2]
    assert sizes == [17, 9, 4]  # 30 layers at 4:2:1, largest remainders


def test_proportional_ranges_tile_and_give_everyone_a_layer():
    for weights in ([1, 1, 1], [1000, 1, 1], [3, 2], [5]):
        out = proportional_ranges(10, weights)
        assert [r for r in out if r is not None][-1].stop == 10
        assert all(r is not None and len(r) >= 1 for r in out)


def test_lp_without_profiles_balances_by_weight_bytes(registry):
    per = (10,) * 12
    req = PartitionRequest(num_layers=12, num_workers=3, layer_weight_bytes=per)
    assert registry.partition("lp", req) == [LayerRange(0, 4), LayerRange(4, 8), LayerRange(8, 12)]


def test_lp_gives_a_slow_worker_few_layers_or_none(registry):
    fast, slow = worker("fast", 1.0, 4000), worker("slow", 8.0, 4000)
    out = registry.assign(
        "lp", request([fast, slow, fast.__class__(**{**fast.__dict__, "name": "fast2"})])
    )
    sizes = [0 if r is None else len(r) for r in out]
    assert sizes[1] <= 2 and sizes[0] + sizes[2] >= 28


def test_lp_matches_the_exact_oracle_and_beats_even(registry):
    ws = [
        worker("flagship", 1.0, 300),
        worker("mid", 2.0, 300),
        worker("mid2", 2.0, 300),
        worker("budget", 4.0, 300),
    ]
    for objective in ("throughput", "latency"):
        req = request(ws, objective)
        lp = registry.assign("lp", req)
        even = registry.assign("even", req)
        problem = build_problem(req)

        def cost(assignment, problem=problem):
            stages = tuple((i, r.start, r.stop) for i, r in enumerate(assignment) if r)
            return evaluate(problem, stages).objective_value

        assert cost(lp) == pytest.approx(solve_dp(problem).objective_value, rel=1e-6)
        assert cost(lp) < cost(even)


def test_lp_latency_respects_memory(registry):
    # Everything on the fastest peer would be best, but it cannot hold it all.
    ws = [worker("fast", 1.0, 250), worker("slow", 3.0, 2000)]
    out = registry.assign("lp", request(ws, "latency"))
    assert out[0] is not None and out[1] is not None
    problem = build_problem(request(ws, "latency"))
    assert problem.stage_bytes(out[0].start, out[0].stop) <= 250 * MiB


def test_lp_reports_a_model_that_does_not_fit(registry):
    ws = [worker("a", 1.0, 100), worker("b", 1.0, 100)]
    with pytest.raises(Infeasible, match="MiB"):
        registry.assign("lp", request(ws))
