"""An in-process transport: endpoints on a shared :class:`MemoryNetwork`, for unit tests.

It keeps the semantics the mesh relies on (admission by secret, delivery only between
connected peers, failures as PeerUnreachable) and lets tests kill peers and cut links.
"""

from __future__ import annotations

import hashlib
from contextlib import suppress

import trio
import trio.testing

from meshllm import hookimpl
from meshllm.mesh.contain import contain
from meshllm.mesh.transport import (
    AdmissionRefused,
    EndpointOptions,
    Message,
    PeerUnreachable,
)

_QUEUE = 1024


class MemoryNetwork:
    def __init__(self) -> None:
        self.endpoints: dict[str, MemoryEndpoint] = {}
        self._cut: set[frozenset[str]] = set()

    def cut(self, a: str, b: str) -> None:
        """Drop everything between peers *a* and *b* (both directions)."""
        self._cut.add(frozenset((a, b)))

    def heal(self) -> None:
        self._cut.clear()

    def partition(self, *groups: set[str]) -> None:
        """Cut every link between different groups."""
        for i, g in enumerate(groups):
            for h in groups[i + 1 :]:
                for a in g:
                    for b in h:
                        self.cut(a, b)

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) not in self._cut


class MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, options: EndpointOptions):
        self.network = network
        self.options = options
        self.peer_id = "mem-" + hashlib.sha256(options.key_seed).hexdigest()[:16]
        self._send, self._recv = trio.open_memory_channel[Message](_QUEUE)
        self._peers: set[str] = set()
        self._handlers: dict[str, object] = {}
        self._nursery: trio.Nursery | None = None
        self.running = False

    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}"]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.network.endpoints[self.peer_id] = self
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.running = False
            self.network.endpoints.pop(self.peer_id, None)
            for other in list(self._peers):
                peer = self.network.endpoints.get(other)
                if peer is not None:
                    peer._peers.discard(self.peer_id)

    def _reach(self, peer_id: str) -> MemoryEndpoint:
        peer = self.network.endpoints.get(peer_id)
        if peer is None or not peer.running or not self.network.linked(self.peer_id, peer_id):
            raise PeerUnreachable(f"peer {peer_id} is unreachable")
        return peer

    async def dial(self, addr: str) -> str:
        await trio.sleep(0)
        peer_id = addr.rsplit("/", 1)[-1]
        peer = self._reach(peer_id)
        if peer.options.secret.auth_key != self.options.secret.auth_key:
            raise AdmissionRefused(f"peer {peer_id} refused us: wrong mesh secret")
        self._peers.add(peer_id)
        peer._peers.add(self.peer_id)
        return peer_id

    async def send(self, peer_id: str, payload: bytes) -> None:
        await trio.sleep(0)
        if peer_id not in self._peers:
            raise PeerUnreachable(f"not connected to {peer_id}")
        peer = self._reach(peer_id)
        # A flooded receiver drops, as a real one would stall and reset the stream.
        with suppress(trio.WouldBlock):
            peer._send.send_nowait(Message(self.peer_id, payload))

    @property
    def messages(self) -> trio.MemoryReceiveChannel[Message]:
        return self._recv

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._peers and peer_id in self.network.endpoints

    def set_stream_handler(self, protocol: str, handler) -> None:  # type: ignore[no-untyped-def]
        self._handlers[protocol] = handler

    async def open_stream(self, peer_id: str, protocol: str) -> MemoryStream:
        await trio.sleep(0)
        if peer_id not in self._peers:
            raise PeerUnreachable(f"not connected to {peer_id}")
        peer = self._reach(peer_id)
        handler = peer._handlers.get(protocol)
        if handler is None or peer._nursery is None:
            raise PeerUnreachable(f"{peer_id} does not speak {protocol}")
        ours, theirs = trio.testing.memory_stream_pair()
        peer._nursery.start_soon(
            contain, protocol, self.peer_id, handler, MemoryStream(self.peer_id, theirs)
        )
        return MemoryStream(peer_id, ours)


class MemoryTransport:
    name = "memory"

    def __init__(self, network: MemoryNetwork | None = None):
        self.network = network or MemoryNetwork()

    def create_endpoint(self, options: EndpointOptions) -> MemoryEndpoint:
        return MemoryEndpoint(self.network, options)


@hookimpl
def meshllm_register_transports(register):  # type: ignore[no-untyped-def]
    register(MemoryTransport())


class MemoryStream:
    """One side of an in-memory byte stream pair."""

    def __init__(self, peer_id: str, stream: trio.abc.Stream):
        self.peer_id = peer_id
        self._stream = stream

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerUnreachable(f"stream to {self.peer_id} broke") from None

    async def write(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerUnreachable(f"stream to {self.peer_id} broke") from None

    async def close(self) -> None:
        await self._stream.aclose()
