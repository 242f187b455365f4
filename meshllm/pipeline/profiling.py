"""Profiling over the mesh: each peer measures itself, the leader turns profiles into a plan.

A peer profiles itself for a model when asked (a ``profile`` app message, sent by the leader
before it plans, or by ``meshllm profile``): it fetches the probe graphs (weights excluded)
from the model's source, times them (:mod:`meshllm.device`), measures the round trip and
bandwidth of its links to every live peer over protocol ``probe``, and publishes the result on
its heartbeats. Profiles are kept per model and re-measured only on request.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import cbor2
import structlog
import trio

from meshllm import wire
from meshllm.config import Config
from meshllm.device import calibrate, memory_budget, probe_ranges, resident_bytes
from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.node import MeshNode
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.model.segment_files import SegmentInfo
from meshllm.model.store import ModelStore
from meshllm.partitioners import PartitionRequest, WorkerProfile
from meshllm.pipeline import files, memory_lesson
from meshllm.pipeline.peerstate import PeerState
from meshllm.plan.profile import LinkStats, Profile

PROBE_PROTOCOL = "probe"
PING_BYTES = 64
BULK_BYTES = 256 << 10
MAX_PROBE_FRAME = 1 << 20
log = structlog.get_logger("meshllm.profile")


def median_layer_bytes(manifest: Manifest) -> int:
    return int(statistics.median(manifest.per_layer_weight_bytes))


def probe_dir(home: Path, sha: str, start: int, stop: int) -> Path:
    """Where *home* keeps the probe graph of layers ``[start, stop)`` of model *sha*."""
    return files.cache_dir(home, sha) / "probes" / f"{start}-{stop}"


def end_bytes_of(manifest: Manifest, probes: dict[str, Path]) -> tuple[int, int]:
    """Extra memory of the first and last stages (embedding, lm_head), from the ``first``
    and ``last`` probe graphs' segment.json."""
    per = manifest.per_layer_weight_bytes
    first = SegmentInfo.from_json((probes["first"] / "segment.json").read_text())
    last = SegmentInfo.from_json((probes["last"] / "segment.json").read_text())
    return max(0, first.weight_bytes - per[0]), max(0, last.weight_bytes - per[-1])


class Profiler:
    """This peer's profiles, and the mesh's as heard on heartbeats."""

    def __init__(
        self, home: Path, config: Config, endpoint: Endpoint, node: MeshNode, store: ModelStore
    ):
        self.home = home
        self.config = config
        self.endpoint = endpoint
        self.node = node
        self.store = store
        self.me = endpoint.peer_id
        self.mine: dict[str, Profile] = {}  # model sha -> this peer's profile
        self.latest: Profile | None = None  # the one on heartbeats
        self.busy: set[str] = set()
        self.errors: dict[str, str] = {}  # model sha -> why profiling failed
        self._lock = trio.Lock()  # one calibration at a time: they would skew each other
        endpoint.set_stream_handler(PROBE_PROTOCOL, self._on_probe_stream)

    # -- heartbeats ---------------------------------------------------------------------------
    def extra(self) -> dict[str, Any]:
        x: dict[str, Any] = {} if self.latest is None else {"profile": self.latest.to_obj()}
        if self.errors:
            x["profile_errors"] = self.errors
        return x

    def error_of(self, peer: str, sha: str) -> str | None:
        """Why *peer* could not profile itself for *sha*, if it said so."""
        if peer == self.me:
            return self.errors.get(sha)
        state = self.node.state_of(peer)
        return state.profile_errors.get(sha) if isinstance(state, PeerState) else None

    def profile_of(self, peer: str, sha: str) -> Profile | None:
        if peer == self.me:
            return self.mine.get(sha)
        state = self.node.state_of(peer)
        prof = state.profile if isinstance(state, PeerState) else None
        return prof if prof is not None and prof.model_sha == sha else None

    # -- measuring ----------------------------------------------------------------------------
    async def meta_dir(self, sha: str, source: str) -> Path:
        return await files.meta_dir(self.endpoint, self.home, self.store, sha, source)

    async def probe_dirs(self, sha: str, source: str, manifest: Manifest) -> dict[str, Path]:
        """The probe graphs (no weights), fetched from *source* into the cache."""
        ranges = probe_ranges(manifest.architecture.num_layers, median_layer_bytes(manifest))
        local = self.store.by_sha(sha)
        out = {}
        for kind, (a, b) in ranges.items():
            d = probe_dir(self.home, sha, a, b)
            if local is not None:
                # The source cuts the segment and copies only its graph: the probe directory
                # gets generated weights, which must never overwrite the real ones.
                ((seg, _),) = await trio.to_thread.run_sync(local.segment_files, [LayerRange(a, b)])
                d.mkdir(parents=True, exist_ok=True)
                for name in files.PROBE_FILES:
                    shutil.copyfile(seg.parent / name, d / name)
            else:
                for name in files.PROBE_FILES:
                    if not (d / name).exists():
                        req = files.FileRequest(sha, "probe", name, a, b)
                        await files.fetch_file(self.endpoint, source, req, d / name)
            out[kind] = d
        return out

    async def end_bytes(self, sha: str, source: str) -> tuple[int, int]:
        """Extra memory of the first and last stages (embedding, lm_head), from the probes."""
        manifest = Manifest.read(await self.meta_dir(sha, source))
        return end_bytes_of(manifest, await self.probe_dirs(sha, source, manifest))

    async def profile(self, sha: str, source: str, *, refresh: bool = False) -> Profile:
        """This peer's profile for model *sha*, measured now unless known (or *refresh*)."""
        async with self._lock:
            known = self.mine.get(sha)
            if known is not None and not refresh:
                self.latest = known
                return known
            self.busy.add(sha)
            self.node.announce()
            try:
                prof = await self._measure(sha, source)
            except (MeshError, OSError, ValueError) as exc:
                self.errors[sha] = str(exc)
                self.node.announce()
                log.warning("profile_failed", sha=sha[:12], reason=str(exc))
                raise
            finally:
                self.busy.discard(sha)
            self.errors.pop(sha, None)
            self.mine[sha] = self.latest = prof
            self.node.announce()
            log.info(
                "profile_measured",
                sha=sha[:12],
                layer_ms=round(prof.layer_s * 1e3, 3),
                last_ms=round(prof.last_s * 1e3, 3),
                hop_ms=round(prof.hop_s * 1e3, 3),
                memory_mib=prof.memory_bytes >> 20,
                overhead_mib=prof.overhead_bytes >> 20,
                weight_factor=round(prof.weight_factor, 3),
                links=len(prof.links),
            )
            return prof

    async def _measure(self, sha: str, source: str) -> Profile:
        manifest = Manifest.read(await self.meta_dir(sha, source))
        probes = await self.probe_dirs(sha, source, manifest)
        ranges = probe_ranges(manifest.architecture.num_layers, median_layer_bytes(manifest))
        arch, kv, threads = manifest.architecture, manifest.kv_names, self.config.peer.threads
        cal, idle = await trio.to_thread.run_sync(
            lambda: calibrate(probes, ranges, arch, kv, threads=threads)
        )
        handoff = await self._handoff_s()
        mem, exact = memory_budget(self.config.peer.memory_limit_mb)
        # Measured after the probes ran, so the runtime this peer will serve with is loaded.
        overhead = (resident_bytes() or 0) + cal.session_bytes
        links = {}
        for peer in self.node.alive_peers():
            try:
                links[peer] = await self.measure_link(peer)
            except (MeshError, trio.TooSlowError, EOFError, ValueError) as exc:
                # One unreachable link is not a reason to have no profile: the planner
                # treats a link it has no figures for as free of transfer time.
                log.warning("link_probe_failed", other=peer, reason=str(exc) or "timeout")
        return Profile(
            model_sha=sha,
            layer_s=cal.layer_s,
            first_s=cal.first_s,
            last_s=cal.last_s,
            prefill_layer_s=cal.prefill_layer_s,
            hop_s=cal.run_s + handoff,
            idle_layer_s=idle.layer_s,
            idle_first_s=idle.first_s,
            idle_last_s=idle.last_s,
            idle_hop_s=idle.run_s + handoff,
            memory_bytes=mem,
            memory_exact=exact,
            threads=threads,
            measured_at=time.time(),
            links=links,
            overhead_bytes=overhead,
            weight_factor=min(cal.weight_factor, 8.0),
            learned_max_bytes=memory_lesson.lesson(self.home) or 0,
        )

    @staticmethod
    async def _handoff_s() -> float:
        """What handing a step to ONNX Runtime's thread and back costs here (median)."""
        times = []
        for _ in range(21):
            t = time.perf_counter()
            await trio.to_thread.run_sync(lambda: None)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    async def measure_link(self, peer: str) -> LinkStats:
        """Round trip of small frames and bandwidth of a bulk frame, over the activation path."""
        with trio.fail_after(30):
            stream = await self.endpoint.open_stream(peer, PROBE_PROTOCOL)
            try:
                reader = FrameReader(stream.read, MAX_PROBE_FRAME)
                rtts = []
                for _ in range(7):
                    t = time.perf_counter()
                    await stream.write(frame(cbor2.dumps({"echo": b"\0" * PING_BYTES})))
                    await reader.read_frame()
                    rtts.append(time.perf_counter() - t)
                rtt = statistics.median(rtts)
                t = time.perf_counter()
                await stream.write(frame(cbor2.dumps({"sink": b"\0" * BULK_BYTES})))
                await reader.read_frame()
                bulk = time.perf_counter() - t
            finally:
                await stream.close()
        return LinkStats(rtt_s=rtt, bandwidth_Bps=BULK_BYTES / max(bulk - rtt, 1e-6))

    async def _on_probe_stream(self, stream: Stream) -> None:
        reader = FrameReader(stream.read, MAX_PROBE_FRAME)
        try:
            while True:
                with trio.fail_after(30):
                    kind, data = probe_message(wire.loads(await reader.read_frame()))
                if kind == "echo":
                    await stream.write(frame(cbor2.dumps({"echo": data})))
                else:
                    await stream.write(frame(cbor2.dumps({"got": len(data)})))
        except (EOFError, PeerUnreachable, FrameError, trio.TooSlowError, ValueError):
            return  # the prober finished or went away
        except wire.BadMessage as exc:
            log.warning("probe_dropped", other=stream.peer_id, reason=str(exc))
        finally:
            await stream.close()


def probe_message(raw: Any) -> tuple[str, bytes]:
    """A link probe: ``{echo: bytes}`` (answered with the same bytes) or ``{sink: bytes}``
    (answered with their count). Raises :class:`~meshllm.wire.BadMessage`."""
    obj = wire.mapping(raw, "probe message", 4)
    for kind in ("echo", "sink"):
        if isinstance(obj.get(kind), bytes):
            return kind, obj[kind]
    raise wire.BadMessage("a probe message holds echo or sink bytes")


SUSTAINED, IDLE = "sustained", "idle"


def slowed(prof: Profile, factor: float) -> Profile:
    """*prof* for a device now *factor* times slower (as the balancer measured it)."""
    if factor == 1.0:
        return prof
    from dataclasses import replace

    return replace(
        prof,
        layer_s=prof.layer_s * factor,
        first_s=prof.first_s * factor,
        last_s=prof.last_s * factor,
        hop_s=prof.hop_s * factor,
        idle_layer_s=prof.idle_layer_s * factor,
        idle_first_s=prof.idle_first_s * factor,
        idle_last_s=prof.idle_last_s * factor,
        idle_hop_s=prof.idle_hop_s * factor,
    )


def regime_for(objective: str) -> str:
    """Which figures price a plan: a latency plan serves one request at a time, so each stage
    idles between steps; a throughput plan keeps every stage busy."""
    return IDLE if objective == "latency" else SUSTAINED


def worker_profile(
    peer: str, prof: Profile, num_layers: int, memory_fraction: float, regime: str = SUSTAINED
) -> WorkerProfile:
    """A measured profile in the partitioner's terms."""
    mem = prof.memory_bytes if prof.memory_exact else int(prof.memory_bytes * memory_fraction)
    mem = int((mem - prof.overhead_bytes) / prof.weight_factor)
    if prof.learned_max_bytes:
        mem = min(mem, prof.learned_max_bytes)  # it was killed for memory holding more
    layer, first, last = (
        (prof.idle_layer_s, prof.idle_first_s, prof.idle_last_s)
        if regime == IDLE
        else (prof.layer_s, prof.first_s, prof.last_s)
    )
    return WorkerProfile(
        name=peer,
        memory_bytes=max(mem, 1),
        layer_s=(layer,) * num_layers,
        first_s=first,
        last_s=last,
    )


def kv_bytes_per_layer(manifest: Manifest, config: Config) -> int:
    arch = manifest.architecture
    import numpy as np

    per_token = 2 * arch.num_key_value_heads * arch.head_size * np.dtype(arch.kv_dtype).itemsize
    return per_token * config.plan.context_tokens * config.plan.concurrency


def activation_bytes(manifest: Manifest) -> int:
    """Bytes crossing a cut per decode step: two hidden-state vectors (float32) and framing."""
    return 2 * manifest.architecture.hidden_size * 4 + 256


def partition_request(
    workers: list[str],
    profiles: dict[str, Profile],
    manifest: Manifest,
    ends: tuple[int, int],
    config: Config,
    regime: str | None = None,
) -> PartitionRequest:
    """What the partitioner decides from: model sizes, and each worker's measured figures.

    Each stage's outgoing transfer includes its fixed per-step cost (``hop_s``: handing the
    step to ONNX Runtime and back, one segment run), so every stage pays it exactly once.
    A worker without a profile (it failed to measure) is taken to be a typical one.
    """
    regime = regime or regime_for(config.plan.objective)
    n = manifest.architecture.num_layers
    kv = kv_bytes_per_layer(manifest, config)
    layer_bytes = tuple(b + kv for b in manifest.per_layer_weight_bytes)
    if not profiles:
        return PartitionRequest(
            num_layers=n,
            num_workers=len(workers),
            layer_weight_bytes=manifest.per_layer_weight_bytes,
            layer_bytes=layer_bytes,
            first_bytes=ends[0],
            last_bytes=ends[1],
            objective=config.plan.objective,
        )
    typical = sorted(profiles.values(), key=lambda p: p.layer_s)[len(profiles) // 2]
    profs = [profiles.get(w, typical) for w in workers]
    act = activation_bytes(manifest)

    def one_way(i: int, j: int, nbytes: int) -> float:
        if i == j:
            return 0.0
        here, there = profs[i].links.get(workers[j]), profs[j].links.get(workers[i])
        link = here or there
        base = profs[i].idle_hop_s if regime == IDLE else profs[i].hop_s
        return base + (link.transfer_s(nbytes) if link is not None else 0.0)

    w = len(workers)
    link_s = tuple(tuple(one_way(i, j, act) for j in range(w)) for i in range(w))
    return_s = tuple(tuple(one_way(i, j, 64) for j in range(w)) for i in range(w))
    frac = config.plan.memory_fraction
    return PartitionRequest(
        num_layers=n,
        num_workers=w,
        layer_weight_bytes=manifest.per_layer_weight_bytes,
        layer_bytes=layer_bytes,
        first_bytes=ends[0],
        last_bytes=ends[1],
        workers=tuple(
            worker_profile(p, prof, n, frac, regime) for p, prof in zip(workers, profs, strict=True)
        ),
        link_s=link_s,
        return_s=return_s,
        objective=config.plan.objective,
    )


def predict(
    workers: list[str],
    profiles: dict[str, Profile],
    manifest: Manifest,
    ends: tuple[int, int],
    config: Config,
    stages,  # type: ignore[no-untyped-def]
) -> dict[str, Any]:
    """The cost model's figures for a plan (any partitioner's), memory caps aside.

    ``step_s``: one decode step of a single request (stages priced after idle spells);
    ``stage_s`` and ``bottleneck_s``: each stage under sustained load, which bounds the
    aggregate rate of many requests at 1 / bottleneck_s.
    """
    from dataclasses import replace

    from meshllm.partitioners import build_problem
    from meshllm.plan import evaluate

    index = {w: i for i, w in enumerate(workers)}
    chosen = tuple((index[s.peer], s.start, s.stop) for s in stages)
    out: dict[str, Any] = {"objective": config.plan.objective}
    for regime in (IDLE, SUSTAINED):
        req = partition_request(workers, profiles, manifest, ends, config, regime)
        uncapped = replace(req, workers=tuple(replace(w, memory_bytes=0) for w in req.workers))
        sol = evaluate(build_problem(uncapped), chosen)
        if regime == IDLE:
            out["step_s"] = sol.step_s
        else:
            out["stage_s"] = list(sol.stage_s)
            out["bottleneck_s"] = max(sol.stage_s)
    return out
