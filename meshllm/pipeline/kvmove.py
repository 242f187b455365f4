"""Moving requests' KV caches to the peers of a new plan, instead of replaying the requests.

When the leader replaces a plan while requests are running (a rebalance), the peers of the
old plan still hold every request's KV cache. The coordinator sends each request's next step
to the new plan with a :class:`KVSource` (the old plan's stages and how many positions every
one of them has computed for sure); each new stage, on that first frame, fetches the caches of
its layers from the old stages that ran them and continues from there. Copying the cache is
exact (the same bytes the old stages computed), and it costs one transfer of the moved layers'
caches instead of re-running every token so far through the whole pipeline.

Anything that goes wrong (an old peer gone, its runtime already released, a malformed reply)
is a :class:`KVMoveFailed`; the coordinator then replays the request instead.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import cbor2
import numpy as np
import structlog
import trio

from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.runtime import KVLayer, SegmentRuntime
from meshllm.pipeline.frames import KVSource, is_int
from meshllm.pipeline.stage import KVMoveFailed

KV_PROTOCOL = "kv"
MAX_REQUEST = 4096
FETCH_TIMEOUT_S = 15.0
# How long a peer keeps the runtime of a plan it no longer serves, for others to fetch from.
RETIRED_KEEP_S = 30.0

log = structlog.get_logger("meshllm.kvmove")


Lookup = Callable[[int], SegmentRuntime | None]


async def serve(stream: Stream, lookup: Lookup) -> None:
    """Answer one KV request: ``{e, r, l, n}`` -> one frame per layer, then ``{done}``."""
    try:
        await _serve(stream, lookup)
    finally:
        await stream.close()


async def _serve(stream: Stream, lookup: Lookup) -> None:
    reader = FrameReader(stream.read, MAX_REQUEST)
    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            req = cbor2.loads(await reader.read_frame())
        epoch, rid, layers, length = req["e"], req["r"], req["l"], req["n"]
        if not (
            is_int(epoch)
            and isinstance(rid, str)
            and is_int(length)
            and isinstance(layers, list)
            and all(is_int(x) for x in layers)
        ):
            raise ValueError("malformed request")  # fmt: skip
    except (EOFError, FrameError, PeerUnreachable, trio.TooSlowError):
        return
    except Exception:  # bad CBOR or fields: a confused or hostile peer gets nothing
        return
    runtime = lookup(epoch)
    try:
        if runtime is None:
            raise KVMoveFailed(f"this peer no longer holds plan {epoch}'s caches")
        kv = await trio.to_thread.run_sync(runtime.export_kv, rid, layers, length)
        msgs = [{"l": layer, "k": k.tobytes(), "v": v.tobytes()} for layer, (k, v) in kv.items()]
    except MeshError as exc:
        msgs = [{"err": str(exc)}]
    except Exception as exc:  # a bug here must not take the daemon down with it
        log.exception("kv_serve_bug", rid=rid[:8])
        msgs = [{"err": f"internal error: {exc!r}"}]
    with suppress(PeerUnreachable):  # the fetching stage gave up or went away
        for msg in [*msgs, {"done": True}]:
            await stream.write(frame(cbor2.dumps(msg)))


@dataclass(frozen=True)
class Wanted:
    """What a new stage needs: request *rid*'s cache of *layers*, each key (and value) of
    *shape* (kv_heads, length, head_size) and *dtype*."""

    rid: str
    layers: list[int]
    shape: tuple[int, int, int]
    dtype: np.dtype


async def fetch(endpoint: Endpoint, me: str, lookup: Lookup, src: KVSource, want: Wanted
                ) -> dict[int, KVLayer]:  # fmt: skip
    """The KV cache *want* asks for, from the old stages that ran those layers."""
    out: dict[int, KVLayer] = {}

    async def one(peer: str, mine: list[int]) -> None:
        if peer == me:
            runtime = lookup(src.epoch)
            if runtime is None:
                raise KVMoveFailed(f"plan {src.epoch}'s runtime is gone here")
            kv = await trio.to_thread.run_sync(runtime.export_kv, want.rid, mine, src.length)
            out.update(kv)
            return
        out.update(await _fetch_remote(endpoint, peer, src, want, mine))

    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for peer, start, stop in src.stages:
                    mine = [x for x in want.layers if start <= x < stop]
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
    missing = sorted(set(want.layers) - set(out))
    if missing:
        raise KVMoveFailed(f"no old stage ran layers {missing}")
    return out


async def _fetch_remote(
    endpoint: Endpoint, peer: str, src: KVSource, want: Wanted, layers: list[int]
) -> dict[int, KVLayer]:
    rid, dtype = want.rid, want.dtype
    shape = (1, *want.shape)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    stream = await endpoint.open_stream(peer, KV_PROTOCOL)
    try:
        await stream.write(frame(cbor2.dumps({"e": src.epoch, "r": rid, "l": layers,
                                              "n": src.length})))  # fmt: skip
        reader = FrameReader(stream.read, 2 * nbytes + 1024)
        got: dict[int, KVLayer] = {}
        while True:
            try:
                msg = cbor2.loads(await reader.read_frame())
            except (EOFError, FrameError) as exc:
                raise KVMoveFailed(f"{peer} broke off the KV transfer: {exc}") from None
            except Exception:
                raise KVMoveFailed(f"{peer} sent a malformed KV message") from None
            if not isinstance(msg, dict):
                raise KVMoveFailed(f"{peer} sent a malformed KV message")
            if "err" in msg:
                raise KVMoveFailed(f"{peer}: {str(msg['err'])[:500]}")
            if msg.get("done") is True:
                return got
            layer, k, v = msg.get("l"), msg.get("k"), msg.get("v")
            if (
                layer not in layers
                or layer in got
                or not isinstance(k, bytes)
                or not isinstance(v, bytes)
                or len(k) != nbytes
                or len(v) != nbytes
            ):
                raise KVMoveFailed(f"{peer} sent a KV layer that was not asked for or does "
                                   "not fit")  # fmt: skip
            got[layer] = (
                np.frombuffer(k, dtype).reshape(shape),
                np.frombuffer(v, dtype).reshape(shape),
            )
    finally:
        await stream.close()
