"""Moving requests' KV caches to the peers of a new plan, instead of replaying the requests.

When the leader replaces a plan while requests are running (a rebalance), the peers of the
old plan still hold every request's KV cache. The coordinator sends each request's next step
to the new plan with a :class:`KVSource` (the old plan's stages and how many positions every
one of them has computed for sure); each new stage, on that first frame, fetches the caches of
its layers from the old stages that ran them and continues from there. Copying the cache is
exact (the same bytes the old stages computed), and it costs one transfer of the moved layers'
caches instead of re-running every token so far through the whole pipeline.

So that the transfer overlaps the coordinator noticing the change, a peer that takes a stage
of the new plan also *prefetches* right away every cache the old stages hold for its layers
(:func:`prefetch`); a request's first frame then finds its cache here already, cut to the
positions the request needs, and only what is missing is fetched (:func:`fetch`).

Anything that goes wrong (an old peer gone, its runtime already released, a malformed reply)
is a :class:`KVMoveFailed`; the coordinator then replays the request instead.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
import structlog
import trio

from meshllm import wire
from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.runtime import KVLayer, SegmentRuntime
from meshllm.pipeline.frames import KVSource
from meshllm.pipeline.stage_requests import KVMoveFailed

KV_PROTOCOL = "kv"
MAX_REQUEST = 4096
FETCH_TIMEOUT_S = 15.0
# How long a peer keeps the runtime of a plan it no longer serves, for others to fetch from.
RETIRED_KEEP_S = 30.0

log = structlog.get_logger("meshllm.kvmove")

Lookup = Callable[[int], SegmentRuntime | None]
Stages = tuple[tuple[str, int, int], ...]  # a plan's (peer, start, stop) stages
# rid -> (positions, layer -> (key, value)): what an old stage held for some layers.
Caches = dict[str, tuple[int, dict[int, KVLayer]]]


@dataclass(frozen=True)
class Layout:
    """The shape of one layer's key (or value) cache per position: (kv_heads, head_size), its
    dtype, and the most positions a request can have."""

    kv_heads: int
    head_size: int
    dtype: np.dtype
    max_positions: int

    def nbytes(self, positions: int) -> int:
        return self.kv_heads * positions * self.head_size * self.dtype.itemsize

    def shape(self, positions: int) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, positions, self.head_size)


# -- serving ---------------------------------------------------------------------------------
async def serve(stream: Stream, lookup: Lookup) -> None:
    """Answer one request ``{e, l, r?, n?}``: plan *e*'s cache of layers *l* for request *r*
    at *n* positions, or without *r* for every request held (each at its own length). One
    frame ``{r, n, l, k, v}`` per request and layer, then ``{done}`` (or ``{err}``)."""
    try:
        await _serve(stream, lookup)
    finally:
        await stream.close()


def _layer(value: Any, what: str) -> int:
    return wire.integer(value, what, 0, 4096)


def parse_request(req: Any) -> tuple[int, list[int], str | None, int]:
    """``{e, l, r?, n?}`` checked (raises :class:`~meshllm.wire.BadMessage`)."""
    req = wire.mapping(req, "KV request")
    return (
        wire.integer(req.get("e"), "epoch"),
        wire.seq_of(req.get("l"), "layers", 1024, _layer),
        wire.optional(req.get("r"), "request id", lambda v, w: wire.text(v, w, 64)),
        wire.integer(req.get("n", 0), "positions", 0, 2**31),
    )


def _export(runtime: SegmentRuntime, layers: list[int], rid: str | None, length: int) -> Caches:
    """*rid*'s cache of *layers* at *length* positions, or with no *rid* every request's,
    each at the positions it has."""
    if rid is not None:
        return {rid: (length, runtime.export_kv(rid, layers, length))}
    return {
        r: (n, runtime.export_kv(r, layers, n))
        for r in runtime.open_requests
        if (n := runtime.cached_length(r))
    }


async def _serve(stream: Stream, lookup: Lookup) -> None:
    reader = FrameReader(stream.read, MAX_REQUEST)
    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            epoch, layers, rid, length = parse_request(wire.loads(await reader.read_frame()))
    except (EOFError, FrameError, PeerUnreachable, trio.TooSlowError):
        return
    except wire.BadMessage as exc:  # a confused or hostile peer gets nothing
        log.warning("kv_request_refused", other=stream.peer_id, reason=str(exc))
        return
    runtime = lookup(epoch)
    try:
        if runtime is None:
            raise KVMoveFailed(f"this peer no longer holds plan {epoch}'s caches")
        caches = await trio.to_thread.run_sync(_export, runtime, layers, rid, length)
        msgs = [
            {"r": r, "n": n, "l": layer, "k": k.tobytes(), "v": v.tobytes()}
            for r, (n, kv) in caches.items()
            for layer, (k, v) in kv.items()
        ]
    except MeshError as exc:
        msgs = [{"err": str(exc)}]
    except Exception as exc:  # a bug here must not take the daemon down with it
        log.exception("kv_serve_bug")
        msgs = [{"err": f"internal error: {exc!r}"}]
    with suppress(PeerUnreachable):  # the fetching stage gave up or went away
        for msg in [*msgs, {"done": True}]:
            await stream.write(frame(cbor2.dumps(msg)))


# -- fetching --------------------------------------------------------------------------------
async def _gather(
    endpoint: Endpoint,
    me: str,
    lookup: Lookup,
    epoch: int,
    stages: Stages,
    layers: list[int],
    layout: Layout,
    rid: str | None = None,
    length: int = 0,
) -> list[Caches]:
    """What every old stage holding some of *layers* has of them (see :func:`_export`), asked
    of all at once: this peer's own old stage directly, the others over the mesh. Failures
    become one KVMoveFailed."""
    parts: list[Caches] = []

    async def one(peer: str, mine: list[int]) -> None:
        if peer != me:
            req = {"e": epoch, "l": mine, **({"r": rid, "n": length} if rid else {})}
            parts.append(await _pull(endpoint, peer, req, layout))
            return
        runtime = lookup(epoch)
        if runtime is None:
            raise KVMoveFailed(f"plan {epoch}'s runtime is gone here")
        parts.append(await trio.to_thread.run_sync(_export, runtime, mine, rid, length))

    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for peer, start, stop in stages:
                    mine = [x for x in layers if start <= x < stop]
                    if mine:
                        nursery.start_soon(one, peer, mine)
    except trio.TooSlowError:
        raise KVMoveFailed(f"the KV cache did not arrive within {FETCH_TIMEOUT_S:g} s") from None
    except ExceptionGroup as group:
        failed, rest = group.split(MeshError)
        if rest is not None or failed is None:
            raise
        first = failed.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise KVMoveFailed(f"cannot move the KV cache: {first}") from None
    return parts


async def fetch(
    endpoint: Endpoint,
    me: str,
    lookup: Lookup,
    src: KVSource,
    rid: str,
    layers: list[int],
    layout: Layout,
) -> dict[int, KVLayer]:
    """Request *rid*'s cache of *layers* at ``src.length`` positions, from the old stages."""
    out: dict[int, KVLayer] = {}
    for part in await _gather(
        endpoint, me, lookup, src.epoch, src.stages, layers, layout, rid, src.length
    ):
        if set(part) != {rid} or part[rid][0] != src.length:
            raise KVMoveFailed("an old stage sent another request's cache")
        out.update(part[rid][1])
    missing = sorted(set(layers) - set(out))
    if missing:
        raise KVMoveFailed(f"no old stage ran layers {missing}")
    return out


async def prefetch(
    endpoint: Endpoint,
    me: str,
    lookup: Lookup,
    epoch: int,
    stages: Stages,
    layers: list[int],
    layout: Layout,
) -> Caches:
    """Every request's cache of *layers* that plan *epoch*'s stages hold now (each request
    at the fewest positions any of them has)."""
    parts = await _gather(endpoint, me, lookup, epoch, stages, layers, layout)
    merged: Caches = {}
    for rid in set.intersection(*(set(p) for p in parts)) if parts else set():
        n = min(p[rid][0] for p in parts)
        kv = {
            layer: (k[:, :, :n], v[:, :, :n]) for p in parts for layer, (k, v) in p[rid][1].items()
        }
        if sorted(kv) == sorted(layers):
            merged[rid] = (n, kv)
    return merged


@dataclass(frozen=True)
class KVPart:
    """One layer of one request's cache, as an old stage sends it."""

    rid: str
    positions: int
    layer: int
    key: bytes
    value: bytes


# Requests an old stage may send caches of in one reply ([limits] max_concurrent_requests is
# far lower): a bound on what one reply can make this peer hold.
MAX_REPLY_REQUESTS = 1024


def parse_reply(raw: Any, layout: Layout, asked: list[int]) -> KVPart | None:
    """One message of a KV reply: a layer (:class:`KVPart`), or None at its end. Raises
    :class:`~meshllm.wire.BadMessage` if malformed, :class:`KVMoveFailed` if the old stage
    says it failed."""
    msg = wire.mapping(raw, "KV message", 8)
    if "err" in msg:
        err = msg["err"]
        raise KVMoveFailed(err[:500] if isinstance(err, str) else "failed")
    if msg.get("done") is True:
        return None
    n = wire.integer(msg.get("n"), "positions", 1, layout.max_positions + 1)
    layer = wire.integer(msg.get("l"), "layer", 0, 4096)
    if layer not in asked:
        raise wire.BadMessage(f"layer {layer} was not asked for")
    key, value = msg.get("k"), msg.get("v")
    if not (
        isinstance(key, bytes)
        and isinstance(value, bytes)
        and len(key) == len(value) == layout.nbytes(n)
    ):
        raise wire.BadMessage("a KV layer that does not fit its positions")
    return KVPart(wire.text(msg.get("r"), "request id", 64), n, layer, key, value)


async def _pull(endpoint: Endpoint, peer: str, req: dict[str, Any], layout: Layout) -> Caches:
    stream = await endpoint.open_stream(peer, KV_PROTOCOL)
    try:
        await stream.write(frame(cbor2.dumps(req)))
        reader = FrameReader(stream.read, 2 * layout.nbytes(layout.max_positions) + 1024)
        got: Caches = {}
        while True:
            try:
                part = parse_reply(wire.loads(await reader.read_frame()), layout, req["l"])
            except (EOFError, FrameError) as exc:
                raise KVMoveFailed(f"{peer} broke off the KV transfer: {exc}") from None
            except wire.BadMessage as exc:
                raise KVMoveFailed(f"{peer} sent a malformed KV message: {exc}") from None
            except KVMoveFailed as exc:
                raise KVMoveFailed(f"{peer}: {exc}") from None
            if part is None:
                return got
            if part.rid not in got and len(got) >= MAX_REPLY_REQUESTS:
                raise KVMoveFailed(f"{peer} sent caches of more than {MAX_REPLY_REQUESTS} requests")
            held = got.setdefault(part.rid, (part.positions, {}))
            if held[0] != part.positions or part.layer in held[1]:
                raise KVMoveFailed(f"{peer} sent a KV layer twice or at two lengths")
            shape = layout.shape(part.positions)
            key = np.frombuffer(part.key, layout.dtype).reshape(shape)
            held[1][part.layer] = (key, np.frombuffer(part.value, layout.dtype).reshape(shape))
    finally:
        await stream.close()
