"""The transport interface the mesh is written against; no library types cross it.

A transport gives each peer an :class:`Endpoint`: an identity on the network, a way to dial an
address (which also runs admission: only holders of the mesh secret get through), and
fire-and-forget delivery of small control messages to connected peers. Built-ins: ``libp2p``
(the default) and ``memory`` (in-process, for fast deterministic tests).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import trio

from meshllm.errors import MeshError
from meshllm.mesh.identity import MeshSecret


class PeerUnreachable(MeshError):
    """A peer could not be reached (no route, connection refused, timed out, closed)."""


class AdmissionRefused(MeshError):
    """A peer did not prove it holds the mesh secret (or refused our proof)."""


@dataclass(frozen=True)
class Message:
    sender: str
    payload: bytes


class Stream(Protocol):
    """A reliable byte stream to one admitted peer, for bulk data (activations, files)."""

    peer_id: str

    async def read(self, max_bytes: int) -> bytes:
        """Up to *max_bytes*; b"" at end of stream. Raises PeerUnreachable if broken."""
        ...

    async def write(self, data: bytes) -> None:
        """Send all of *data*. Raises PeerUnreachable if broken."""
        ...

    async def close(self) -> None: ...


StreamHandler = Callable[[Stream], Awaitable[None]]


@runtime_checkable
class SendsNow(Protocol):
    """Optional for a stream: a write from a thread other than the event loop's (a stage's
    compute thread), done at once or not at all."""

    def send_now(self, data: bytes, timeout: float = 5.0) -> bool:
        """True once *data* is sent; False, having sent nothing, when it cannot be done
        without the event loop (the caller then uses ``write``)."""
        ...


@runtime_checkable
class ReadsBlocking(Protocol):
    """Optional for a stream: reads on a thread of its own, without the event loop."""

    def read_blocking(self, max_bytes: int, stop: threading.Event) -> bytes:
        """Like ``read``; b"" at the end of the stream or once *stop* is set."""
        ...

    def close_reader(self) -> None:
        """The reading thread is done with the stream."""
        ...


@dataclass(frozen=True)
class EndpointOptions:
    """What every transport gets to build an endpoint. Its repr leaves the key seed out and
    shows the secret's fingerprint only (see :class:`MeshSecret`)."""

    key_seed: bytes = field(repr=False)  # the peer's private key: never printed
    secret: MeshSecret
    listen: tuple[str, ...]
    handshake_timeout_s: float = 2.0


class Endpoint(Protocol):
    """One peer's presence on a transport."""

    peer_id: str

    def listen_addrs(self) -> list[str]:
        """Addresses others can dial, each including this peer's id; valid once running."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started()`` once dialable."""
        ...

    async def dial(self, addr: str) -> str:
        """Connect to *addr* and run admission; returns the peer id.

        Raises :class:`AdmissionRefused` or :class:`PeerUnreachable`.
        """
        ...

    async def send(self, peer_id: str, payload: bytes) -> None:
        """Deliver one control message to a connected, admitted peer (raises PeerUnreachable)."""
        ...

    @property
    def messages(self) -> trio.MemoryReceiveChannel[Message]:
        """Control messages from admitted peers, in arrival order."""
        ...

    def is_connected(self, peer_id: str) -> bool: ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve streams of *protocol* (a short name such as ``"act"``) opened by admitted
        peers; each stream gets its own task running *handler*."""
        ...

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open a stream of *protocol* to an admitted peer (raises PeerUnreachable)."""
        ...


@runtime_checkable
class ReportsStats(Protocol):
    """Optional for an endpoint: figures about its own work (bytes compressed, say), a small
    JSON-able dict that ``meshllm status --json`` shows as ``transport_stats``."""

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class Transport(Protocol):
    """A named transport factory, registered through ``meshllm_register_transports``."""

    name: str

    def create_endpoint(self, options: EndpointOptions) -> Endpoint: ...
