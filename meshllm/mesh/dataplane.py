"""A fast data plane for bulk streams (activations): encrypted TCP keyed over libp2p.

py-libp2p's Noise + yamux stack costs about a millisecond and a half per small message between
processes, paid several times per generated token. For the activation protocol the libp2p
endpoint instead negotiates, over an admitted and encrypted libp2p stream, a fresh 256-bit key
and a single-use ticket; the dialer then opens a plain TCP connection to the listener's data
port, presents the ticket, and from then on every record is ChaCha20-Poly1305 encrypted and
authenticated under that key (nonces: a direction byte and a counter, never reused). A TCP
connection without a valid, unexpired ticket is closed at once; a forged or replayed record
fails authentication and breaks the stream. If the fast path cannot be set up, the endpoint
falls back to a libp2p stream.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshllm import wire
from meshllm.mesh.contain import contain
from meshllm.mesh.transport import PeerUnreachable

TICKET_BYTES = 32
RECORD_MAX = 1 << 20
_LEN = struct.Struct(">I")
log = structlog.get_logger("meshllm.dataplane")


class EncryptedStream:
    """A TCP stream carrying length-prefixed AEAD records, behind the Stream interface."""

    def __init__(self, peer_id: str, tcp: trio.SocketStream, key: bytes, dialer: bool):
        self.peer_id = peer_id
        self._tcp = tcp
        self._aead = ChaCha20Poly1305(key)
        self._send_prefix = b"D\0\0\0" if dialer else b"L\0\0\0"
        self._recv_prefix = b"L\0\0\0" if dialer else b"D\0\0\0"
        self._send_n = 0
        self._recv_n = 0
        self._raw = bytearray()
        self._plain = bytearray()
        self._eof = False
        # Sends go out two ways: ``write`` from the event loop, and ``send_now`` from a stage's
        # compute thread (its output leaves without waiting for the loop to wake up). One
        # thread lock orders them, so records (and nonces) never interleave; ``_direct`` is a
        # duplicate of the socket that either side can hand bytes to without the scheduler.
        self._tlock = threading.Lock()
        self._direct: socket.socket | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._direct = socket.fromfd(tcp.socket.fileno(), tcp.socket.family, tcp.socket.type)
            self._direct.setblocking(False)
        self._broken = ""  # why a send from the thread left a record half written
        self._reader: socket.socket | None = None  # read_blocking's own handle on the socket
        self._poll: select.poll | None = None

    def _seal(self, data: bytes) -> bytearray:
        out = bytearray()
        for i in range(0, max(len(data), 1), RECORD_MAX):
            nonce = self._send_prefix + self._send_n.to_bytes(8, "big")
            self._send_n += 1
            ct = self._aead.encrypt(nonce, data[i : i + RECORD_MAX], None)
            out += _LEN.pack(len(ct)) + ct
        return out

    def _send_direct(self, out: bytearray) -> int:
        assert self._direct is not None
        try:
            return self._direct.send(out)
        except BlockingIOError:
            return 0

    async def _lock_sends(self) -> None:
        # The thread holds the lock only while the kernel takes a record (or, rarely, while
        # it waits a bounded time for room): poll rather than block the event loop.
        while not self._tlock.acquire(blocking=False):
            await trio.sleep(0.0002)

    async def write(self, data: bytes) -> None:
        await self._lock_sends()
        try:
            if self._broken:
                raise PeerUnreachable(f"data link to {self.peer_id} broke: {self._broken}")
            out = self._seal(data)
            if self._direct is not None:
                # An activation frame nearly always fits the socket's buffer: handing it
                # over directly skips send_all's scheduler round trips (a few hundred µs
                # per hop on a small machine, paid several times per generated token).
                sent = self._send_direct(out)
                if sent == len(out):
                    return
                del out[:sent]
            await self._tcp.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnreachable(f"data link to {self.peer_id} broke: {exc}") from None
        finally:
            self._tlock.release()

    def send_now(self, data: bytes, timeout: float = 5.0) -> bool:
        """From a thread other than the event loop's: send *data* as one message now.

        Returns False, having sent nothing, when that cannot be done without the event loop
        (another send in progress, no direct socket); the caller then uses ``write``. A
        record the kernel takes only in part is finished here, waiting at most *timeout*;
        past that the stream is broken (later writes fail, and the caller reopens a stream).
        """
        if self._direct is None or not self._tlock.acquire(blocking=False):
            return False
        try:
            if self._broken:
                return False
            out = self._seal(data)
            try:
                sent = self._send_direct(out)
                deadline = time.monotonic() + timeout
                while sent < len(out):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._broken = "a send timed out halfway through a record"
                        return False
                    select.select([], [self._direct], [], left)
                    sent += self._send_direct(memoryview(out)[sent:])
            except OSError as exc:
                self._broken = str(exc) or type(exc).__name__
                return False
            return True
        finally:
            self._tlock.release()

    async def _fill(self, n: int) -> bool:
        while len(self._raw) < n:
            try:
                chunk = await self._tcp.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerUnreachable(f"data link from {self.peer_id} broke: {exc}") from None
            if not self._add_raw(chunk):
                return False
        return True

    def _add_raw(self, chunk: bytes) -> bool:
        if not chunk:
            if self._raw:
                raise PeerUnreachable(f"data link from {self.peer_id} ended mid-record")
            return False
        self._raw += chunk
        return True

    def _record_size(self) -> int:
        (size,) = _LEN.unpack_from(self._raw)
        if size > RECORD_MAX + 16:
            raise PeerUnreachable(f"oversized record from {self.peer_id}")
        return size

    def _open_record(self, size: int) -> None:
        ct = bytes(self._raw[_LEN.size : _LEN.size + size])
        del self._raw[: _LEN.size + size]
        nonce = self._recv_prefix + self._recv_n.to_bytes(8, "big")
        self._recv_n += 1
        try:
            self._plain += self._aead.decrypt(nonce, ct, None)
        except InvalidTag:
            raise PeerUnreachable(f"forged or corrupted record from {self.peer_id}") from None

    def _take_plain(self, max_bytes: int) -> bytes:
        data = bytes(self._plain[:max_bytes])
        del self._plain[:max_bytes]
        return data

    async def read(self, max_bytes: int) -> bytes:
        while not self._plain and not self._eof:
            if not await self._fill(_LEN.size):
                self._eof = True
                break
            size = self._record_size()
            if not await self._fill(_LEN.size + size):
                raise PeerUnreachable(f"data link from {self.peer_id} ended mid-record")
            self._open_record(size)
        return self._take_plain(max_bytes)

    # A stream is read either with ``read`` (by a task) or with ``read_blocking`` (by one
    # thread of its own, which then owns the reading side), never both.
    POLL_S = 0.25  # how soon a blocked reader notices *stop*

    def _fill_blocking(self, n: int, stop: threading.Event) -> bool:
        if self._reader is None:
            try:
                self._reader = socket.fromfd(
                    self._tcp.socket.fileno(), self._tcp.socket.family, self._tcp.socket.type
                )
            except (OSError, AttributeError) as exc:
                raise PeerUnreachable(f"data link from {self.peer_id}: {exc}") from None
            self._poll = select.poll()
            self._poll.register(self._reader, select.POLLIN)
        sock, poll = self._reader, self._poll
        assert poll is not None
        while len(self._raw) < n:
            if stop.is_set():
                return False
            try:
                if not poll.poll(1000 * self.POLL_S):
                    continue
                chunk = sock.recv(1 << 16)
            except BlockingIOError:  # the socket is non-blocking (shared with the loop's)
                continue
            except OSError as exc:
                raise PeerUnreachable(f"data link from {self.peer_id} broke: {exc}") from None
            if not self._add_raw(chunk):
                return False
        return True

    def read_blocking(self, max_bytes: int, stop: threading.Event) -> bytes:
        """Like ``read``, on a thread: blocks until data, the end of the stream or *stop*
        (both give b"")."""
        while not self._plain and not self._eof:
            if not self._fill_blocking(_LEN.size, stop):
                self._eof = not stop.is_set()
                break
            size = self._record_size()
            if not self._fill_blocking(_LEN.size + size, stop):
                if stop.is_set():
                    break
                raise PeerUnreachable(f"data link from {self.peer_id} ended mid-record")
            self._open_record(size)
        return self._take_plain(max_bytes)

    def close_reader(self) -> None:
        """The reading thread is done: release its handle on the socket."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def close(self) -> None:
        await self._lock_sends()
        try:
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            self._broken = self._broken or "closed"
        finally:
            self._tlock.release()
        await self._tcp.aclose()


@dataclass
class _Expected:
    peer_id: str
    protocol: str
    key: bytes = field(repr=False)  # the connection's AEAD key: never printed
    expires: float


@dataclass(frozen=True)
class Ticket:
    """The listener's answer to a data-plane request (negotiated over an admitted libp2p
    stream): the port to connect to, the single-use ticket to present and the link's key."""

    port: int
    ticket: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def to_obj(self) -> dict[str, Any]:
        return {"port": self.port, "ticket": self.ticket, "key": self.key}

    @classmethod
    def from_obj(cls, raw: Any) -> Ticket:
        """The listener's reply (raises :class:`~meshllm.wire.BadMessage`, with the listener's
        own error text when it refused)."""
        obj = wire.mapping(raw, "data-plane reply", 8)
        ticket, key = obj.get("ticket"), obj.get("key")
        if not (isinstance(ticket, bytes) and len(ticket) == TICKET_BYTES):
            raise wire.BadMessage(f"no data-plane ticket: {wire.show(obj.get('error'), 200)}")
        if not (isinstance(key, bytes) and len(key) == 32):
            raise wire.BadMessage("the data-plane key is not 32 bytes")
        return cls(wire.integer(obj.get("port"), "data port", 1, 65536), ticket, key)


def ticket_request(raw: Any) -> str:
    """The protocol a data-plane request ``{protocol}`` asks for (raises BadMessage)."""
    return wire.text(wire.mapping(raw, "data-plane request", 8).get("protocol"), "protocol", 16)


class DataPlaneListener:
    """Accepts ticketed TCP connections and hands them to the protocol's stream handler."""

    def __init__(
        self,
        host: str,
        dispatch: Callable[[str, EncryptedStream], Awaitable[None]],
        ticket_ttl_s: float = 10.0,
    ):
        self.host = host
        self.dispatch = dispatch
        self.ticket_ttl_s = ticket_ttl_s
        self.port = 0
        self._expected: dict[bytes, _Expected] = {}

    def issue(self, peer_id: str, protocol: str) -> tuple[bytes, bytes]:
        """A (ticket, key) pair for one connection from *peer_id*."""
        now = time.monotonic()
        for t in [t for t, e in self._expected.items() if e.expires < now]:
            del self._expected[t]
        ticket, key = secrets.token_bytes(TICKET_BYTES), secrets.token_bytes(32)
        self._expected[ticket] = _Expected(peer_id, protocol, key, now + self.ticket_ttl_s)
        return ticket, key

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._accept, listeners, handler_nursery=nursery)

    async def _accept(self, tcp: trio.SocketStream) -> None:
        # Anyone who can reach the port gets here, before any proof of the secret: a reset
        # or garbage must cost this connection only, never the listener's nursery.
        try:
            await contain("data_link", None, self._serve_connection, tcp)
        finally:
            with contextlib.suppress(Exception):
                await tcp.aclose()

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        ticket = b""
        with trio.move_on_after(2):
            while len(ticket) < TICKET_BYTES:
                try:
                    chunk = await tcp.receive_some(TICKET_BYTES - len(ticket))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    chunk = b""
                if not chunk:
                    break
                ticket += chunk
        expected = self._expected.pop(ticket, None)
        if expected is None or expected.expires < time.monotonic():
            log.warning("data_link_refused", reason="no valid ticket")
            return
        stream = EncryptedStream(expected.peer_id, tcp, expected.key, dialer=False)
        try:
            await self.dispatch(expected.protocol, stream)
        finally:
            await stream.close()


async def connect(host: str, port: int, peer_id: str, ticket: bytes, key: bytes) -> EncryptedStream:
    try:
        tcp = await trio.open_tcp_stream(host, port)
        await tcp.send_all(ticket)
    except OSError as exc:
        raise PeerUnreachable(f"data port of {peer_id} unreachable: {exc}") from None
    return EncryptedStream(peer_id, tcp, key, dialer=True)
