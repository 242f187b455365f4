"""The ``speed`` partitioner on hand-made requests, through meshllm's own registry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence

import meshllm_speed_partitioner.plugin as plugin_module
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshllm_speed_partitioner import SpeedPartitioner

from meshllm.model.ranges import LayerRange
from meshllm.partitioners import PartitionRequest, WorkerProfile, build_problem
from meshllm.plan import Infeasible, evaluate
from meshllm.plugins import PartitionerRegistry, get_plugin_manager

MiB = 1 << 20
LAYER = 10 * MiB


@pytest.fixture(scope="module")
def registry() -> Iterator[PartitionerRegistry]:
    """A registry with the built-ins and this plugin, registered as its entry point would be."""
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(plugin_module, name="speed-under-test")
    try:
        yield PartitionerRegistry(pm)
    finally:
        pm.unregister(plugin_module)


def worker(name: str, layer_ms: float, memory_mib: int = 0, layers: int = 30) -> WorkerProfile:
    return WorkerProfile(name, memory_bytes=memory_mib * MiB, layer_s=(layer_ms / 1e3,) * layers)


def request(
    workers: Sequence[WorkerProfile], layers: int = 30, first_mib: int = 0, last_mib: int = 0
) -> PartitionRequest:
    return PartitionRequest(
        num_layers=layers,
        num_workers=len(workers),
        layer_bytes=(LAYER,) * layers,
        first_bytes=first_mib * MiB,
        last_bytes=last_mib * MiB,
        workers=tuple(workers),
    )


def sizes(out: Sequence[LayerRange | None]) -> list[int | None]:
    return [None if r is None else len(r) for r in out]


def test_layers_follow_speed(registry: PartitionerRegistry) -> None:
    # 4:2:1 speeds over 28 layers: exactly 16, 8 and 4, in pipeline order.
    ws = [worker("a", 10, layers=28), worker("b", 20, layers=28), worker("c", 40, layers=28)]
    out = registry.assign("speed", request(ws, layers=28))
    assert out == [LayerRange(0, 16), LayerRange(16, 24), LayerRange(24, 28)]


def test_pipeline_order_is_kept_whoever_is_fastest(registry: PartitionerRegistry) -> None:
    out = registry.assign("speed", request([worker("a", 40), worker("b", 40), worker("c", 10)]))
    assert out == [LayerRange(0, 5), LayerRange(5, 10), LayerRange(10, 30)]


def test_equal_speeds_split_evenly(registry: PartitionerRegistry) -> None:
    assert sizes(registry.assign("speed", request([worker(n, 5) for n in "abc"]))) == [10] * 3


def test_memory_caps_a_share_and_the_rest_goes_by_speed(registry: PartitionerRegistry) -> None:
    # b would get 7.5 of 30 layers by speed but holds only 3 (35 MiB, 10 MiB a layer); the 27
    # others go to a and c at 2:1.
    ws = [worker("a", 10), worker("b", 20, memory_mib=35), worker("c", 20)]
    out = registry.assign("speed", request(ws))
    assert out == [LayerRange(0, 18), LayerRange(18, 21), LayerRange(21, 30)]


def test_memory_at_the_ends_counts_the_embedding_and_lm_head(registry: PartitionerRegistry) -> None:
    # The last worker holds 45 MiB: with a 25 MiB lm_head that is 2 layers, not 4.
    ws = [worker("a", 10), worker("b", 10), worker("c", 10, memory_mib=45)]
    out = registry.assign("speed", request(ws, first_mib=25, last_mib=25))
    assert sizes(out)[2] == 2 and sum(sizes(out)) == 30  # type: ignore[arg-type]
    problem = build_problem(request(ws, first_mib=25, last_mib=25))
    assert problem.stage_bytes(28, 30) <= problem.devices[2].memory_bytes


def test_a_worker_short_of_its_share_leaves_the_rest_to_all_after_it(
    registry: PartitionerRegistry,
) -> None:
    # a holds 10 middle layers, but only 4 next to the 60 MiB embedding: b and c share the
    # 26 left equally, rather than b taking all the difference.
    ws = [worker("a", 10, memory_mib=100), worker("b", 10), worker("c", 10)]
    out = registry.assign("speed", request(ws, first_mib=60))
    assert out == [LayerRange(0, 4), LayerRange(4, 17), LayerRange(17, 30)]


def test_a_worker_that_cannot_hold_one_layer_is_left_out(registry: PartitionerRegistry) -> None:
    ws = [worker("a", 10), worker("tiny", 1, memory_mib=5), worker("c", 10)]
    assert registry.assign("speed", request(ws)) == [LayerRange(0, 15), None, LayerRange(15, 30)]


def test_a_worker_that_cannot_hold_the_embedding_is_not_first(
    registry: PartitionerRegistry,
) -> None:
    # a holds 8 middle layers but not layer 0 with its 100 MiB embedding: b starts the pipeline.
    ws = [worker("a", 10, memory_mib=80), worker("b", 10), worker("c", 10)]
    out = registry.assign("speed", request(ws, first_mib=100))
    assert out[0] is None and out[1] is not None and out[1].start == 0


def test_a_model_that_cannot_fit_is_the_error_lp_raises(registry: PartitionerRegistry) -> None:
    ws = [worker("a", 10, memory_mib=100), worker("b", 10, memory_mib=100)]
    with pytest.raises(Infeasible, match=r"needs 300\.0 MiB but the peers offer 200\.0 MiB"):
        registry.assign("speed", request(ws))
    with pytest.raises(Infeasible) as from_lp:
        registry.assign("lp", request(ws))
    with pytest.raises(Infeasible) as from_speed:
        registry.assign("speed", request(ws))
    assert str(from_speed.value) == str(from_lp.value)


def test_without_profiles_every_worker_counts_as_equal(registry: PartitionerRegistry) -> None:
    out = registry.assign("speed", PartitionRequest(num_layers=30, num_workers=3))
    assert sizes(out) == [10, 10, 10]


def test_more_workers_than_layers_leaves_some_out(registry: PartitionerRegistry) -> None:
    out = registry.assign("speed", request([worker(n, 5, layers=3) for n in "abcde"], layers=3))
    assert [r for r in out if r is not None] == [
        LayerRange(0, 1),
        LayerRange(1, 2),
        LayerRange(2, 3),
    ]


def test_it_asks_the_leader_for_profiles() -> None:
    assert SpeedPartitioner.uses_profiles is True


@settings(max_examples=150, deadline=None)
@given(
    layers=st.integers(1, 40),
    specs=st.lists(st.tuples(st.floats(0.5, 50), st.integers(0, 400)), min_size=1, max_size=6),
    ends=st.tuples(st.integers(0, 60), st.integers(0, 60)),
)
def test_any_request_gets_a_fitting_plan_or_infeasible(
    registry: PartitionerRegistry,
    layers: int,
    specs: list[tuple[float, int]],
    ends: tuple[int, int],
) -> None:
    ws = [worker(f"w{i}", ms, mib, layers) for i, (ms, mib) in enumerate(specs)]
    req = request(ws, layers=layers, first_mib=ends[0], last_mib=ends[1])
    try:
        out = registry.assign("speed", req)  # the registry checks the ranges tile the layers
    except Infeasible:
        with pytest.raises(Infeasible):
            registry.assign("lp", req)
        return
    stages = tuple((i, r.start, r.stop) for i, r in enumerate(out) if r is not None)
    problem = build_problem(req)
    mine = evaluate(problem, stages)  # raises if any stage is over its worker's memory
    # lp is optimal for the same cost model, so the heuristic can only be as fast or slower.
    lp = registry.assign("lp", req)
    best = evaluate(problem, tuple((i, r.start, r.stop) for i, r in enumerate(lp) if r is not None))
    assert best.objective_value <= mine.objective_value * (1 + 1e-6)


def test_installed_entry_point_is_listed_by_meshllm_plugins() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshllm", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    owner = info["partitioners"].get("speed")
    assert owner is not None, "meshllm-speed-partitioner is not installed (tools/setup.sh)"
    assert {
        "name": owner,
        "kind": "entry point",
        "hooks": ["meshllm_register_partitioners"],
    } in info["plugins"]
