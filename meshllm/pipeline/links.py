"""Activation links: frames in and out of this peer.

Protocol ``act`` carries activation frames, one persistent stream per next hop. Frames that
come in are decoded once (a frame that does not decode is dropped, and its coordinator told
why when that can be read) and handed on: tokens and errors to the coordinator, work to this
peer's stage. A fast link (one that can be read while blocking) gets a reader thread of its
own, which runs a decode step for an idle stage there and then, without the event loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import structlog
import trio

from meshllm.config import Config
from meshllm.errors import MeshError
from meshllm.mesh.contain import contain_sync
from meshllm.mesh.framing import BlockingFrameReader, FrameError, FrameReader, frame
from meshllm.mesh.node import MeshNode
from meshllm.mesh.transport import Endpoint, PeerUnreachable, ReadsBlocking, SendsNow, Stream
from meshllm.pipeline.frames import (
    ERROR,
    FWD,
    TOKEN,
    BadFrame,
    Frame,
    bounce,
    decode_frame,
    encode_frame,
)
from meshllm.pipeline.serving_state import ServingState

ACT_PROTOCOL = "act"
log = structlog.get_logger("meshllm.serve")

Deliver = Callable[[Frame], None]  # a token or an error, for the coordinator
SendRaw = Callable[[bytes], bool]  # a stream's send_now (see SendsNow)


class _Link:
    """The persistent activation stream to one peer; writes are serialised."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.lock = trio.Lock()
        # The stream's send_now, looked up once per stream: an isinstance check against a
        # runtime-checkable Protocol costs microseconds, and this runs for every token.
        self._checked: Stream | None = None
        self._send_now: SendRaw | None = None

    def sender(self) -> SendRaw | None:
        """The current stream's send_now, if it has one (see SendsNow)."""
        stream = self.stream
        if stream is not self._checked:
            self._checked = stream
            self._send_now = stream.send_now if isinstance(stream, SendsNow) else None
        return self._send_now


class Links:
    def __init__(
        self,
        endpoint: Endpoint,
        node: MeshNode,
        config: Config,
        state: ServingState,
        deliver: Deliver,
    ):
        self.endpoint = endpoint
        self.node = node
        self.config = config
        self.state = state
        self.me = endpoint.peer_id
        self._deliver = deliver
        self._links: dict[str, _Link] = {}
        # One thread per incoming fast link, apart from to_thread's default limit.
        self._readers = trio.CapacityLimiter(1024)
        self._nursery: trio.Nursery | None = None  # for error replies
        self._token: trio.lowlevel.TrioToken | None = None  # for reader threads' callbacks
        endpoint.set_stream_handler(ACT_PROTOCOL, self._on_act_stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            task_status.started()
            await trio.sleep_forever()

    # -- out ----------------------------------------------------------------------------------
    async def send_frame(self, peer: str, f: Frame) -> None:
        if peer == self.me:
            self.dispatch(f)
            return
        link = self._links.get(peer)
        if link is None:
            # Frames name their coordinator: only a known peer gets a link (and a place in
            # this map, which would otherwise grow with every id a frame made up).
            if not (self.endpoint.is_connected(peer) or self.node.peer_alive(peer)):
                raise PeerUnreachable(f"{peer} is not a connected member of the mesh")
            link = self._links[peer] = _Link()
        data = frame(encode_frame(f))
        # Uncontended (the usual case) the lock is taken without a trip through the scheduler.
        if link.lock.locked():
            await link.lock.acquire()
        else:
            link.lock.acquire_nowait()
        try:
            # An established stream that breaks while its peer is still heard from gets one
            # fresh stream: the receiver drops a half-read frame with the old one, so the
            # frame arrives once.
            for again in (True, False):
                fresh = link.stream is None
                try:
                    if link.stream is None:
                        link.stream = await self.endpoint.open_stream(peer, ACT_PROTOCOL)
                    with trio.fail_after(self.config.mesh.handshake_timeout_s * 5):
                        await link.stream.write(data)
                    return
                except (PeerUnreachable, trio.TooSlowError) as exc:
                    if link.stream is not None:
                        await link.stream.close()
                    link.stream = None
                    if again and not fresh and self.node.peer_alive(peer):
                        log.info("activation_link_reopened", other=peer, reason=str(exc))
                        continue
                    raise PeerUnreachable(f"activation link to {peer} failed: {exc}") from None
        finally:
            link.lock.release()

    def send_now(self, peer: str, f: Frame) -> bool:
        """On a stage's compute thread: put *f* on the open fast link to *peer* at once.

        False (nothing sent) when there is no such link yet, the peer is this one, or the
        link is busy; the stage then sends through send_frame as usual.
        """
        if peer == self.me:
            return False
        link = self._links.get(peer)
        send_now = link.sender() if link is not None else None
        if send_now is None:
            return False
        return send_now(frame(encode_frame(f)))

    async def _send_quietly(self, peer: str, f: Frame) -> None:
        with contextlib.suppress(MeshError):
            await self.send_frame(peer, f)

    def _reply_soon(self, peer: str, f: Frame) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, peer, f)

    # -- in -----------------------------------------------------------------------------------
    def dispatch(self, f: Frame) -> None:
        if f.kind in (TOKEN, ERROR):
            self._deliver(f)
            return
        stage = self.state.stage
        if stage is None or stage.epoch != f.epoch:
            if f.kind == FWD:
                reason = "this peer serves no stage of that plan (plan changed?)"
                self._reply_soon(
                    f.coord,
                    Frame(
                        kind=ERROR, rid=f.rid, epoch=f.epoch, step=f.step, error=reason, retry=True
                    ),
                )
            return
        if not stage.submit(f) and f.kind == FWD:
            self._reply_soon(
                f.coord,
                Frame(kind=ERROR, rid=f.rid, epoch=f.epoch, step=f.step, error="stage overloaded"),
            )

    async def _on_act_stream(self, stream: Stream) -> None:
        if isinstance(stream, ReadsBlocking):
            await self._read_on_thread(stream)
            return
        reader = FrameReader(stream.read, self.config.limits.max_frame_mb << 20)
        while True:
            try:
                data = await reader.read_frame()
            except (EOFError, PeerUnreachable, FrameError) as exc:
                _link_ended(exc, stream.peer_id)
                return
            f = self._decode(data, stream.peer_id)
            if f is not None:
                self.dispatch(f)

    def _decode(self, data: bytes, peer_id: str) -> Frame | None:
        """The frame *data* holds; None when it does not decode (on the event loop or on a
        link's reader thread), its coordinator then told why when that can be read."""
        try:
            return decode_frame(data)
        except BadFrame as exc:
            log.warning("frame_dropped", other=peer_id, reason=str(exc))
            back = bounce(data, str(exc))
            if back is not None and self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(
                        contain_sync, "bounce", peer_id, self._reply_soon, *back
                    )
            return None

    async def _read_on_thread(self, stream: ReadsBlocking) -> None:
        """Read a fast link on a thread of its own (see StageRunner.run_here): a decode
        frame for an idle stage is run there and then, without the event loop."""
        token = trio.lowlevel.current_trio_token()
        stop = threading.Event()
        try:
            await trio.to_thread.run_sync(
                self._read_frames,
                stream,
                token,
                stop,
                abandon_on_cancel=True,
                limiter=self._readers,
            )
        finally:
            stop.set()

    def _read_frames(
        self, stream: ReadsBlocking, token: trio.lowlevel.TrioToken, stop: threading.Event
    ) -> None:
        reader = BlockingFrameReader(
            lambda n: stream.read_blocking(n, stop), self.config.limits.max_frame_mb << 20
        )
        try:
            while True:
                try:
                    data = reader.read_frame()
                except (EOFError, PeerUnreachable, FrameError) as exc:
                    _link_ended(exc, stream.peer_id)
                    return
                f = self._decode(data, stream.peer_id)
                if f is None:
                    continue
                if f.kind == FWD and self._run_here(f, token):
                    continue
                try:
                    # Contained: raised in a callback, it would take the event loop down.
                    token.run_sync_soon(contain_sync, "act_frame", stream.peer_id, self.dispatch, f)
                except trio.RunFinishedError:
                    return
        finally:
            stream.close_reader()

    def _run_here(self, f: Frame, token: trio.lowlevel.TrioToken) -> bool:
        # Its own frame, so that no reference to the stage outlives the step: a local in the
        # reader's loop kept a replaced stage (its session, its KV caches) alive for as long
        # as the link stayed quiet, and a phone at its memory cap was killed loading the next.
        stage = self.state.stage
        return stage is not None and stage.run_here(f, token)


def _link_ended(exc: Exception, peer_id: str) -> None:
    if isinstance(exc, FrameError):  # the others are a link's normal ends
        log.warning("act_stream_dropped", other=peer_id, reason=str(exc))
