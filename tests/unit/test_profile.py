"""Device profiles: calibration on a real (tiny) model, memory budget, wire format."""

from __future__ import annotations

import shutil
import statistics

import pytest

from meshllm.config import Config, PlanSection
from meshllm.device import calibrate, memory_budget, probe_ranges
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.pipeline.profiling import partition_request
from meshllm.plan.profile import LinkStats, Profile, ProfileError


def profile(**kw) -> Profile:
    base = dict(
        model_sha="ab" * 32,
        layer_s=0.001,
        first_s=0.0,
        last_s=0.004,
        prefill_layer_s=1e-4,
        hop_s=5e-4,
        idle_layer_s=8e-4,
        idle_first_s=0.0,
        idle_last_s=0.003,
        idle_hop_s=4e-4,
        memory_bytes=1 << 30,
        memory_exact=False,
        threads=1,
        measured_at=1.0,
        links={"peer-b": LinkStats(0.002, 50e6)},
    )
    base.update(kw)
    return Profile(**base)


def test_profile_round_trips_and_rejects_garbage():
    p = profile()
    assert Profile.from_obj(p.to_obj()) == p
    for bad in (
        {},
        {**p.to_obj(), "layer_s": -1},
        {**p.to_obj(), "links": {"x": [1]}},
        {**p.to_obj(), "layer_s": float("nan")},
        {**p.to_obj(), "overhead_bytes": -1},
        {**p.to_obj(), "overhead_bytes": "100"},
        "nonsense",
    ):
        with pytest.raises(ProfileError):
            Profile.from_obj(bad)


def test_profile_overhead_round_trips_and_is_zero_from_older_peers():
    p = profile(overhead_bytes=123 << 20, weight_factor=1.25)
    assert Profile.from_obj(p.to_obj()) == p
    older = {k: v for k, v in p.to_obj().items() if k not in ("overhead_bytes", "weight_factor")}
    assert (Profile.from_obj(older).overhead_bytes, Profile.from_obj(older).weight_factor) == (0, 1)
    for bad in (0.5, 100.0, "1"):
        with pytest.raises(ProfileError):
            Profile.from_obj({**p.to_obj(), "weight_factor": bad})


def test_the_planner_offers_a_peers_memory_minus_its_measured_overhead(tiny_fp32):
    manifest: Manifest = tiny_fp32.manifest
    cfg = Config(plan=PlanSection(memory_fraction=0.5))
    capped = profile(
        memory_bytes=600 << 20, memory_exact=True, overhead_bytes=150 << 20, weight_factor=1.5
    )
    reported = profile(memory_bytes=1 << 30, overhead_bytes=100 << 20)
    req = partition_request(["a", "b"], {"a": capped, "b": reported}, manifest, (0, 0), cfg)
    assert req.workers[0].memory_bytes == 300 << 20  # (600 - 150) / 1.5
    assert req.workers[1].memory_bytes == (1 << 29) - (100 << 20)


def test_memory_budget_prefers_the_configured_limit():
    assert memory_budget(512) == (512 << 20, True)
    got, exact = memory_budget(0)
    assert got > 0 and not exact


def test_probe_ranges_span_past_the_cache_and_stay_inside_the_model():
    r = probe_ranges(30, 14 << 20)
    assert r["first"] == (0, 1) and r["last"] == (29, 30)
    a, b = r["a"], r["b"]
    assert a[0] == 1 and b[0] == 1 and b[1] - 1 == 2 * (a[1] - 1) and b[1] <= 29
    assert (a[1] - a[0]) * (14 << 20) >= 64 << 20
    with pytest.raises(ProfileError):
        probe_ranges(3, 1)


def test_calibration_times_probes_with_generated_weights(tiny_fp32, tmp_path):
    m = tiny_fp32
    ranges = probe_ranges(
        m.manifest.architecture.num_layers,
        int(statistics.median(m.manifest.per_layer_weight_bytes)),
    )
    probes = {}
    for kind, (a, b) in ranges.items():
        ((seg, _),) = m.segment_files([LayerRange(a, b)])
        d = tmp_path / kind
        d.mkdir()
        for name in ("segment.onnx", "segment.json"):  # the graph only, as peers fetch it
            shutil.copy(seg.parent / name, d / name)
        probes[kind] = d
    sustained, idle = calibrate(
        probes, ranges, m.manifest.architecture, m.manifest.kv_names, threads=1
    )
    # An ONNX Runtime session holds memory of its own beyond its weights and KV cache.
    assert sustained.session_bytes > 0 and 1.0 <= sustained.weight_factor <= 4.0
    for cal in (sustained, idle):
        assert cal.layer_s + cal.run_s > 0 and cal.prefill_layer_s >= 0 and cal.run_s >= 0
        assert cal.first_s >= 0 and cal.last_s >= 0
    # A peer keeps no weights it does not run: the generated ones are gone.
    assert not list(tmp_path.rglob("*.data"))


def test_partition_request_from_profiles(tiny_fp32):
    manifest: Manifest = tiny_fp32.manifest
    cfg = Config(plan=PlanSection(memory_fraction=0.5, context_tokens=128, concurrency=2))
    a = profile(links={"b": LinkStats(0.002, 1e6)})
    b = profile(layer_s=0.004, memory_bytes=64 << 20, memory_exact=True, links={})
    req = partition_request(["a", "b", "c"], {"a": a, "b": b}, manifest, (10, 20), cfg)
    idle = partition_request(["a", "b", "c"], {"a": a, "b": b}, manifest, (10, 20), cfg, "idle")
    # Throughput plans are priced under sustained load, single-request ones after idle spells.
    assert req.workers[0].layer_s[0] == a.layer_s and idle.workers[0].layer_s[0] == a.idle_layer_s
    assert idle.link_s[0][1] == pytest.approx(a.idle_hop_s + 0.001 + (2 * 64 * 4 + 256) / 1e6)
    assert req.num_workers == 3 and req.first_bytes == 10 and req.last_bytes == 20
    # Memory: a fraction of what a device reports, a configured limit as is.
    assert req.workers[0].memory_bytes == (1 << 30) // 2
    assert req.workers[1].memory_bytes == 64 << 20
    # A worker that sent no profile is taken to be a typical one.
    assert req.workers[2].layer_s == req.workers[1].layer_s or req.workers[2].layer_s == (
        req.workers[0].layer_s
    )
    # Each hop: the sender's fixed cost plus the link's one-way time (either end's figure).
    act = 2 * manifest.architecture.hidden_size * 4 + 256
    assert req.link_s[0][1] == pytest.approx(a.hop_s + 0.001 + act / 1e6)
    assert req.link_s[1][0] == pytest.approx(b.hop_s + 0.001 + act / 1e6)
    assert req.link_s[0][0] == 0.0
    kv = 2 * manifest.architecture.num_key_value_heads * manifest.architecture.head_size * 4
    assert req.layer_bytes[1] == manifest.per_layer_weight_bytes[1] + kv * 128 * 2


class _Machine:
    """A simulated machine for timing probes: its speed drifts, and some steps hiccup."""

    def __init__(self, slow_during: str, hiccup_every: int = 13):
        self.current = ""
        self.slow_during = slow_during
        self.steps = 0
        self.hiccup_every = hiccup_every

    def step_s(self, cost: float) -> float:
        self.steps += 1
        slow = 2.0 if self.current == self.slow_during else 1.0  # another tenant arrives
        hiccup = 10.0 if self.steps % self.hiccup_every == 0 else 1.0
        return cost * slow * hiccup


def test_probe_timings_keep_their_proportions_on_a_drifting_machine(monkeypatch):
    from meshllm import device as prof

    costs = {"a": 1e-3, "b": 2e-3, "first": 1.2e-3, "last": 1.5e-3}
    machine = _Machine(slow_during="b")

    class FakeProbe:
        def __init__(self, seg_path, arch, kv, *, threads, prompt):
            self.kind, self.pos = str(seg_path), 0

        def start(self) -> float:
            self.pos = 0
            if self.kind != "a":
                machine.current = self.kind  # the pairing with this probe begins
            return machine.step_s(costs[self.kind]) / 8

        @property
        def room(self) -> bool:
            return self.pos < 2000

        def step(self, gap: float = 0.0) -> float:
            self.pos += 1
            return machine.step_s(costs[self.kind])

    monkeypatch.setattr(prof, "_Probe", FakeProbe)
    t = prof.time_probes({k: k for k in costs}, None, None, threads=1, reference="a")
    # Timed one after another, "b" would have come out four times "a" (its own cost twice
    # over, times the slower machine). Paired, each keeps its proportion to the reference,
    # and every figure carries the hiccups alike (the mean is what a generation sees).
    for kind, cost in costs.items():
        for field in ("decode_s", "idle_decode_s"):
            ratio = getattr(t[kind], field) / getattr(t["a"], field)
            assert ratio == pytest.approx(cost / costs["a"], rel=0.05), (kind, field)
    hiccups = 1 + 9 / machine.hiccup_every
    assert t["a"].decode_s > costs["a"] * hiccups * 0.95  # not the median's 1 ms
