"""Measuring this device: the memory it can give a model, and how fast it runs one.

A peer holds only the weights of its own layers, so it cannot time the real model's other
layers. It times *probes* instead: one-layer segments of the real model (the first layer with
the embedding, a middle layer, the last layer with the lm_head), fetched as graphs only, with
weights of the right shapes and types generated locally. The probes run in this peer's own
ONNX Runtime with its thread setting, under whatever CPU share the device really has, long
enough that a CPU quota's throttling is averaged in. What comes out is a
:class:`~meshllm.plan.profile.Profile`, the planner's only input about a device.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshllm import cgroups
from meshllm.plan.profile import MiB, ProfileError


# -- memory ------------------------------------------------------------------------------------
def _kib(path: str, key: str) -> int | None:
    """A ``Key:  N kB`` figure of a /proc file, in bytes."""
    value = cgroups.keyed_number(Path(path), key)
    return None if value is None else value * 1024


def _meminfo_available() -> int | None:
    return _kib("/proc/meminfo", "MemAvailable:")


def _cgroup_headroom() -> int | None:
    """Memory left under this process's cgroup v1 memory limit, if it has one."""
    usage = cgroups.memory_usage(cgroups.own_cgroup("memory"))
    limit, used = usage["memory_limit_bytes"], usage["memory_bytes"]
    return None if limit is None or used is None else max(0, limit - used)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (Linux), or None where it cannot be read.

    What a memory cap cannot take back without swap; file-backed pages (code, memory-mapped
    weights) the kernel can drop and re-read instead of killing the process.
    """
    return _kib("/proc/self/status", "RssAnon:")


def memory_budget(limit_mb: int) -> tuple[int, bool]:
    """(bytes, exact): what this peer can give a model.

    A configured limit is taken as exact (the user said so). Otherwise it is the memory the
    system reports available, or the cgroup's headroom when that is lower; the leader then
    takes only its configured fraction of it, because the rest of the device needs memory too.
    """
    if limit_mb > 0:
        return limit_mb * MiB, True
    figures = [x for x in (_meminfo_available(), _cgroup_headroom()) if x is not None]
    return (min(figures) if figures else 0), False


def _data_bytes(seg_path: Path) -> int:
    """Bytes of a segment's external weights (0 when they are inside its graph file)."""
    try:
        return (seg_path.parent / (seg_path.name + ".data")).stat().st_size
    except OSError:
        return 0


# -- compute -----------------------------------------------------------------------------------
def fill_random_weights(seg_dir: Path, seed: int = 0) -> Path:
    """Write ``segment.onnx.data`` for a weightless probe: right shapes and types, random values.

    Values matter only for speed: floats are small normals (no NaN or denormals, which would
    be slower than real weights), packed integer weights are random bytes.
    """
    import onnx
    from onnx import TensorProto, helper

    from meshllm.model.segment_files import SEGMENT_DATA, SEGMENT_MODEL

    model = onnx.load(str(seg_dir / SEGMENT_MODEL), load_external_data=False)
    rng = np.random.default_rng(seed)
    size = 0
    spans: list[tuple[int, int, int]] = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != SEGMENT_DATA:
            raise ProfileError(f"probe initializer {t.name} points outside the probe")
        off, length = int(info.get("offset", 0)), int(info["length"])
        spans.append((off, length, t.data_type))
        size = max(size, off + length)
    data = seg_dir / SEGMENT_DATA
    with data.open("wb") as fh:
        fh.truncate(size)
        for off, length, dtype in spans:
            np_type = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
            fh.seek(off)
            # In pieces: a whole embedding table at once took several times its size in
            # temporaries, enough to have a phone's memory cap kill the daemon while profiling.
            step = max(np_type.itemsize, _FILL_CHUNK - _FILL_CHUNK % np_type.itemsize)
            for at in range(0, length, step):
                n = min(step, length - at)
                if np.issubdtype(np_type, np.floating):
                    values = rng.standard_normal(n // np_type.itemsize, dtype=np.float32)
                    values *= 0.02
                    fh.write(values.astype(np_type, copy=False).tobytes())
                else:
                    fh.write(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
    return seg_dir / SEGMENT_MODEL


_FILL_CHUNK = 4 * MiB


@dataclass(frozen=True)
class ProbeTiming:
    decode_s: float  # seconds per decode step, steps back to back (sustained load)
    idle_decode_s: float  # seconds per decode step after an idle spell (one request in a pipeline)
    prefill_s: float  # seconds per prompt token in a prefill


class _Probe:
    """One probe segment loaded for timing, serving one request of random inputs."""

    def __init__(self, seg_path: Path, arch: Any, kv: Any, *, threads: int, prompt: int):
        from meshllm.model.ortlib import ort
        from meshllm.model.runtime import SegmentRuntime

        ort()  # loaded before measuring: the runtime itself is not the session's memory
        self.anon_before = anonymous_bytes()
        self.weight_bytes = _data_bytes(seg_path)
        self.extra_bytes: int | None = None  # see start
        self.rt = SegmentRuntime(seg_path, arch, kv, threads=threads)
        self.arch = arch
        self.rng = np.random.default_rng(1)
        # Positions stay within the model's context (its rotary caches end there).
        self.capacity = min(arch.context_length, prompt + 1024)
        self.prompt = min(prompt, self.capacity // 4)
        self.metas = {m.name: m for m in self.rt.session.get_inputs()}
        self.pos = 0

    def _feeds(self, n: int, pos: int) -> dict[str, np.ndarray]:
        from meshllm.model.runtime import ORT_TYPES

        out: dict[str, np.ndarray] = {}
        for name in self.rt.data_inputs:
            if name == "attention_mask":
                out[name] = np.ones((1, pos), dtype=np.int64)
            elif name == "input_ids":
                out[name] = self.rng.integers(0, self.arch.vocab_size, size=(1, n), dtype=np.int64)
            else:
                meta = self.metas[name]
                dims = [d if isinstance(d, int) else self.arch.hidden_size for d in meta.shape[2:]]
                dtype = ORT_TYPES.get(meta.type, np.float32)
                out[name] = self.rng.standard_normal((1, n, *dims)).astype(dtype)
        return out

    def start(self) -> float:
        """Open a fresh request and prefill it; seconds per prompt token."""
        if "probe" in self.rt.open_requests:
            self.rt.close("probe")
        self.rt.open("probe", self.capacity)
        feeds = self._feeds(self.prompt, self.prompt)
        t0 = time.perf_counter()
        self.rt.step("probe", feeds, self.prompt)
        prefill = (time.perf_counter() - t0) / self.prompt
        self.pos = self.prompt
        for _ in range(2):  # warm-up: first-run allocations
            self.step()
        now, before = anonymous_bytes(), self.anon_before
        if self.extra_bytes is None and now is not None and before is not None:
            # What loading and first running it cost beyond its weights and KV cache: its
            # share of the session's own buffers, repacked weights, first-use allocations.
            self.extra_bytes = now - before - self.weight_bytes - self.rt.kv_bytes("probe")
        return prefill

    @property
    def room(self) -> bool:
        return self.pos < self.capacity - 1

    def step(self, gap: float = 0.0) -> float:
        """Seconds of one decode step, after *gap* seconds of idling."""
        self.pos += 1
        feeds = self._feeds(1, self.pos)
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        self.rt.step("probe", feeds, 1)
        return time.perf_counter() - t


@dataclass(frozen=True)
class _Pairing:
    typical: ProbeTiming  # the reference probe's medians
    mean: ProbeTiming  # and its means
    ratio: ProbeTiming  # the other probe's figures over the reference's


def _time_pair(ref: _Probe, other: _Probe, budget_s: float) -> _Pairing:
    """Time *ref* and *other* step by step in turn, so that a drift in the machine's speed
    falls on both alike.

    The other's figure against the reference's is the median of the rounds' ratios: a
    machine's speed scales both of a round's steps alike, and a hiccup (another process's
    turn, a CPU quota's throttling) landing on one step of one round does not move it. Such
    hiccups still count, in time_probes.
    """
    pre = (ref.start(), other.start())
    probes = (ref, other)

    def rounds(n: int, budget: float, gap: float = 0.0) -> tuple[list[float], list[float]]:
        times: tuple[list[float], list[float]] = ([], [])
        spent = 0.0
        while (spent < budget or len(times[0]) < n) and ref.room and other.room:
            # Which goes first alternates: a step right after the other probe's may differ.
            for i in (0, 1) if len(times[0]) % 2 == 0 else (1, 0):
                times[i].append(probes[i].step(gap))
                spent += times[i][-1]
        return times

    busy = rounds(8, 2 * budget_s)
    if not busy[0]:
        raise ProfileError("the model's context is too short to time decode steps")
    # A stage serving one request idles while the other stages compute. A device with a
    # burst budget (a CPU quota, boost clocks) runs such steps faster than back-to-back ones,
    # so single-request plans are priced with steps that each follow an idle spell.
    gap = min(max(0.01, 2 * max(statistics.fmean(t) for t in busy)), 0.1)
    idle = rounds(12, 0.0, gap)
    idle = idle if idle[0] else busy  # no room left in the context for idle steps

    def ratio(t: tuple[list[float], list[float]]) -> float:
        return statistics.median(o / r for r, o in zip(t[0], t[1], strict=True) if r > 0)

    return _Pairing(
        typical=ProbeTiming(statistics.median(busy[0]), statistics.median(idle[0]), pre[0]),
        mean=ProbeTiming(statistics.fmean(busy[0]), statistics.fmean(idle[0]), pre[0]),
        ratio=ProbeTiming(ratio(busy), ratio(idle), pre[1] / pre[0] if pre[0] > 0 else 1.0),
    )


def time_probes(
    segs: dict[str, Path],
    arch: Any,
    kv: Any,
    *,
    threads: int,
    reference: str,
    budget_s: float = 0.2,
    prompt: int = 32,
) -> dict[str, ProbeTiming]:
    """Time every probe segment of *segs* (kind -> segment.onnx), each in turn beside the
    *reference* probe, which stays loaded throughout (so at most two are in memory).

    The calibration rests on differences of these timings (a longer run against a shorter
    one, the ends against a middle layer), and on a shared machine timed one after another
    they swung with its speed: the fixed cost of a run came out anywhere from 0 to 2.3 ms for
    the same probes. Each figure is therefore the reference's median over all the pairings
    times the probe's ratio to the reference within its own pairing, scaled by the
    reference's mean over its median: a device under a CPU quota is throttled in some steps
    and not others, and the mean is what a generation sees. Scaling spreads that over every
    figure alike, where adding it would have put it all into the fixed cost of a run.
    """
    ref = _Probe(segs[reference], arch, kv, threads=threads, prompt=prompt)
    pairs: dict[str, _Pairing] = {}
    for kind, seg in segs.items():
        if kind != reference:
            other = _Probe(seg, arch, kv, threads=threads, prompt=prompt)
            pairs[kind] = _time_pair(ref, other, budget_s)
            del other  # its session's memory goes before the next probe loads
            release_free_memory()  # measured: without, the next probe's memory came on top
    fields = ("decode_s", "idle_decode_s", "prefill_s")

    def over_pairs(which: str, f: str) -> float:
        return statistics.fmean(getattr(getattr(p, which), f) for p in pairs.values())

    base = {f: over_pairs("typical", f) for f in fields}
    scale = {f: over_pairs("mean", f) / base[f] if base[f] > 0 else 1.0 for f in fields}
    out = {
        reference: ProbeTiming(
            **{f: base[f] * scale[f] for f in fields},
        )
    }
    for kind, p in pairs.items():
        out[kind] = ProbeTiming(**{f: base[f] * getattr(p.ratio, f) * scale[f] for f in fields})
    return out


PROBE_TARGET_BYTES = 64 * MiB


def probe_ranges(num_layers: int, layer_bytes: int) -> dict[str, tuple[int, int]]:
    """The layer ranges a peer times: the two ends, and two runs of middle layers.

    The middle runs are sized past common last-level caches (a single layer's weights would
    sit in cache and time unrealistically fast), and two lengths give both the per-layer cost
    (the slope) and the fixed cost of one run of a segment (the intercept).
    """
    if num_layers < 4:
        raise ProfileError(f"a model of {num_layers} layers is too small to profile")
    room = num_layers - 2  # middle layers: 1 .. num_layers-2
    a = max(1, min(room // 2, -(-PROBE_TARGET_BYTES // max(layer_bytes, 1))))
    return {
        "first": (0, 1),
        "a": (1, 1 + a),
        "b": (1, 1 + 2 * a),
        "last": (num_layers - 1, num_layers),
    }


@dataclass(frozen=True)
class Calibration:
    layer_s: float  # decode seconds per middle layer
    run_s: float  # fixed decode seconds of one segment run, whatever its length
    first_s: float  # extra decode seconds of the embedding
    last_s: float  # extra decode seconds of the final norm and lm_head
    prefill_layer_s: float  # prefill seconds per layer per prompt token
    # A loaded segment's memory beyond its KV cache: session_bytes + weight_factor x its
    # weight bytes. ONNX Runtime repacks some weights for its kernels (int4 matmuls: about a
    # third more) and holds buffers of its own.
    session_bytes: int = 0
    weight_factor: float = 1.0


def calibrate(
    probes: dict[str, Path],
    ranges: dict[str, tuple[int, int]],
    arch: Any,
    kv: Any,
    *,
    threads: int,
) -> tuple[Calibration, Calibration]:
    """(sustained, after idle) costs from the probes in *probes* (kind -> directory), whose
    layers are *ranges*."""
    segs: dict[str, Path] = {}
    try:
        for kind in ("a", "b", "first", "last"):
            segs[kind] = fill_random_weights(probes[kind])
        t = time_probes(segs, arch, kv, threads=threads, reference="a")
        session_bytes, weight_factor = session_memory(segs, arch, kv, threads=threads)
    finally:
        # The random weights are only for timing; a peer keeps no weights it does not run.
        for seg in segs.values():
            (seg.parent / (seg.name + ".data")).unlink(missing_ok=True)
    memory = {"session_bytes": session_bytes, "weight_factor": weight_factor}
    return _fit(t, ranges, "decode_s", memory), _fit(t, ranges, "idle_decode_s", memory)


def session_memory(segs: dict[str, Path], arch: Any, kv: Any, *, threads: int) -> tuple[int, float]:
    """(session_bytes, weight_factor): a loaded segment's memory beyond its KV cache is
    session_bytes + weight_factor x its weight bytes.

    Probes ``a`` and ``b`` (twice a's layers) are each loaded alone, with the memory freed by
    the ones before handed back to the system first, and each runs a short prefill: two sizes
    give the per-byte cost (the slope) and the fixed one (the intercept).
    """
    extra: dict[str, tuple[int, int]] = {}
    for kind in ("a", "b"):
        release_free_memory()
        probe = _Probe(segs[kind], arch, kv, threads=threads, prompt=32)
        probe.start()
        extra[kind] = (probe.extra_bytes or 0, probe.weight_bytes)
        del probe
    release_free_memory()
    (ea, wa), (eb, wb) = extra["a"], extra["b"]
    per = (eb - ea) / (wb - wa) if wb > wa else 0.0
    per = min(max(per, 0.0), 3.0)
    fixed = max(0, ea - int(per * wa), eb - int(per * wb))
    return fixed, 1.0 + per


def release_free_memory() -> None:
    """Hand memory the C allocator holds but nothing uses back to the system (glibc).

    Without it, a peer that profiled a model kept the probes' freed memory (measured: 334 MiB
    resident after profiling, 110 MiB after this), which its memory cap counts.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _fit(
    t: dict[str, ProbeTiming],
    ranges: dict[str, tuple[int, int]],
    key: str,
    memory: dict[str, Any],
) -> Calibration:
    """Per-layer cost (slope) and fixed run cost (intercept) from the two middle probes."""

    def d(kind: str) -> float:
        return float(getattr(t[kind], key))

    na = ranges["a"][1] - ranges["a"][0]
    nb = ranges["b"][1] - ranges["b"][0]
    if nb > na:
        layer = max(0.0, (d("b") - d("a")) / (nb - na))
        pre = max(0.0, (t["b"].prefill_s - t["a"].prefill_s) / (nb - na))
    else:
        layer, pre = d("a") / na, t["a"].prefill_s / na
    run = max(0.0, d("a") - na * layer)
    one = run + layer  # what a one-layer segment costs: the ends are measured against it
    return Calibration(
        layer_s=layer,
        run_s=run,
        first_s=max(0.0, d("first") - one),
        last_s=max(0.0, d("last") - one),
        prefill_layer_s=pre,
        **memory,
    )
