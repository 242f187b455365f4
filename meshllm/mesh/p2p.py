"""The libp2p transport: the only module that imports libp2p.

Links are TCP + Noise + yamux only (the security options replace libp2p's defaults, so
plaintext is never offered or accepted), inside a private network whose key is derived from the
mesh secret. On top, every new connection runs an application-level challenge-response
(``/meshllm/auth/1.0.0``): both sides prove they hold the secret with HMACs over fresh nonces and
both peer ids, so a peer id is bound to a key that knows the secret. Only admitted peers may open
any other meshllm protocol.

A wrong secret makes the private-network layer produce garbage, which libp2p would retry for
20-40 s; here every dial has a deadline (the handshake timeout) and inbound upgrades the same
deadline, so both sides report a clear refusal within it.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import suppress
from typing import Any

import cbor2
import structlog
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import X25519PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from meshllm import wire
from meshllm.mesh import dataplane
from meshllm.mesh.addrs import expand_wildcards
from meshllm.mesh.admission import AUTH_PROTOCOL, Admission
from meshllm.mesh.contain import contain, contained
from meshllm.mesh.dataplane import DataPlaneListener
from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.transport import (
    AdmissionRefused,
    EndpointOptions,
    Message,
    PeerUnreachable,
    Stream,
    StreamHandler,
)

DATAPLANE_PROTOCOL = TProtocol("/meshllm/dataplane/1.0.0")
# Bulk protocols that use the encrypted TCP data plane when it can be set up.
FAST_PROTOCOLS = frozenset({"act", "probe", "kv"})
CTL_PROTOCOL = TProtocol("/meshllm/ctl/1.0.0")
MAX_CONTROL_FRAME = 1 << 20
_QUEUE = 1024
log = structlog.get_logger("meshllm.p2p")


def _quiet_libp2p_logs() -> None:
    """Route libp2p's stdlib loggers through ours, at warning level."""
    lib = logging.getLogger("libp2p")
    lib.setLevel(logging.WARNING)
    lib.propagate = True
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.WARNING)
    root = logging.getLogger()
    if not any(isinstance(f, _DropBenign) for f in root.filters):
        root.addFilter(_DropBenign())


class _DropBenign(logging.Filter):
    """libp2p warns on the root logger when an inbound peer has no stored address: benign."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Error getting transport addresses")


def peer_id_from_seed(seed: bytes) -> str:
    return str(ID.from_pubkey(create_new_key_pair(seed=seed).public_key))


class _Watcher(INotifee):
    def __init__(self, endpoint: Libp2pEndpoint):
        self.endpoint = endpoint

    async def connected(self, network: Any, conn: Any) -> None:
        self.endpoint._on_connected(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.endpoint._on_disconnected(str(conn.muxed_conn.peer_id))

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class Libp2pEndpoint:
    def __init__(self, options: EndpointOptions):
        _quiet_libp2p_logs()
        self.options = options
        self._timeout = options.handshake_timeout_s
        self._key = create_new_key_pair(seed=options.key_seed)
        self._id = ID.from_pubkey(self._key.public_key)
        self.peer_id = str(self._id)
        noise_static = X25519PrivateKey.from_bytes(
            hashlib.sha256(b"meshllm/noise-static" + options.key_seed).digest()
        )
        self._host = new_host(
            key_pair=self._key,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(self._key, noise_privkey=noise_static)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            psk=options.secret.pnet_key.hex(),
            connection_config=ConnectionConfig(
                max_connections_per_peer=1, inbound_upgrade_timeout=self._timeout
            ),
            listen_addrs=[Multiaddr(a) for a in options.listen],
        )
        # Peers that proved they hold the mesh secret (see admission.py).
        self._admission = Admission(self, self.options.secret.auth_key)
        self._admitted = self._admission.admitted
        self._out: dict[str, Any] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._send_ch, self._recv_ch = trio.open_memory_channel[Message](_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[str, StreamHandler] = {}
        self._dataplane: DataPlaneListener | None = None
        self.log = log.bind(peer=self.peer_id)

    # -- Endpoint API -------------------------------------------------------------------------
    @property
    def host(self) -> Any:
        return self._host

    @property
    def timeout_s(self) -> float:
        return self._timeout

    def listen_addrs(self) -> list[str]:
        return expand_wildcards([str(a) for a in self._host.get_addrs()])

    @property
    def messages(self) -> trio.MemoryReceiveChannel[Message]:
        return self._recv_ch

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._admitted

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler
        proto = TProtocol(f"/meshllm/{protocol}/1.0.0")

        async def guarded(stream: Any) -> None:
            pid = str(stream.muxed_conn.peer_id)
            if pid not in self._admitted:
                self.log.warning("stream_refused", other=pid, protocol=proto, reason="not admitted")
                with suppress(Exception):
                    await stream.reset()
                return
            wrapped = _P2PStream(pid, stream)
            try:
                await contain(protocol, pid, handler, wrapped)
            finally:
                await wrapped.close()

        self._host.set_stream_handler(proto, guarded)

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        if peer_id not in self._admitted:
            raise PeerUnreachable(f"not connected to {peer_id}")
        if protocol in FAST_PROTOCOLS:
            try:
                with trio.fail_after(self._timeout):
                    return await self._open_fast(peer_id, protocol)
            except (Exception, trio.TooSlowError) as exc:
                self.log.info("data_plane_fallback", other=peer_id, reason=str(exc) or "timeout")
        proto = TProtocol(f"/meshllm/{protocol}/1.0.0")
        try:
            with trio.fail_after(self._timeout):
                raw = await self._host.new_stream(ID.from_base58(peer_id), [proto])
        except (Exception, trio.TooSlowError) as exc:
            raise PeerUnreachable(f"cannot open {protocol} stream to {peer_id}: {exc}") from None
        return _P2PStream(peer_id, raw)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listen = [Multiaddr(a) for a in self.options.listen]
        async with self._host.run(listen_addrs=listen):
            network = self._host.get_network()
            # libp2p re-dials every peer it ever saw; membership decides whom we dial.
            await network.auto_connector.stop()
            self._guard_inbound(network)
            network.register_notifee(_Watcher(self))
            for proto, handler in (
                (AUTH_PROTOCOL, self._admission.answer),
                (CTL_PROTOCOL, self._on_ctl_stream),
                (DATAPLANE_PROTOCOL, self._on_dataplane_request),
            ):
                self._host.set_stream_handler(proto, contained(proto, handler, _remote_peer))
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    host = "127.0.0.1"
                    with suppress(Exception):
                        host = listen[0].value_for_protocol("ip4") or host
                    self._dataplane = DataPlaneListener(host, self._dispatch_fast)
                    await nursery.start(self._dataplane.run)
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                # Leaving run() alone does not close connections: peers would never notice.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._host.close()

    async def dial(self, addr: str) -> str:
        try:
            maddr = Multiaddr(addr)
            info = info_from_p2p_addr(maddr)
        except Exception:
            raise PeerUnreachable(
                f"bad peer address {addr!r} (expected .../tcp/PORT/p2p/ID)"
            ) from None
        pid = str(info.peer_id)
        if pid == self.peer_id:
            raise PeerUnreachable(f"{addr} is this peer's own address")
        if pid in self._admitted:
            return pid
        network = self._host.get_network()
        # libp2p dials only one stored TCP address per peer (a stale one, after the peer
        # restarted on a new port) and blocks a peer for 60 s after a failed dial; membership
        # has its own backoff, so dial exactly the address asked for, now.
        with suppress(Exception):
            network.peerstore.clear_addrs(info.peer_id)
        with suppress(Exception):
            network._negative_peer_cache.evict(pid)
        try:
            with trio.fail_after(self._timeout):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise AdmissionRefused(
                f"no secure handshake with {addr} within {self._timeout:g} s: it holds a "
                "different mesh secret, or is not a meshllm peer"
            ) from None
        except Exception as exc:
            # Connection refused, no route: libp2p gives up after a few quick retries.
            raise PeerUnreachable(f"cannot connect to {addr}: {_root_cause(exc)}") from None
        try:
            with trio.fail_after(self._timeout):
                await self._admission.challenge(info.peer_id)
        except trio.TooSlowError:
            await self.drop(pid)
            raise AdmissionRefused(f"{addr} did not complete the mesh challenge in time") from None
        except AdmissionRefused:
            raise
        except Exception as exc:  # the connection died during the challenge
            await self.drop(pid)
            raise PeerUnreachable(f"lost {addr} during the mesh challenge: {exc}") from None
        return pid

    async def send(self, peer_id: str, payload: bytes) -> None:
        if peer_id not in self._admitted:
            raise PeerUnreachable(f"not connected to {peer_id}")
        lock = self._locks.setdefault(peer_id, trio.Lock())
        async with lock:
            stream = self._out.get(peer_id)
            try:
                with trio.fail_after(self._timeout):
                    if stream is None:
                        stream = await self._host.new_stream(
                            ID.from_base58(peer_id), [CTL_PROTOCOL]
                        )
                        self._out[peer_id] = stream
                    await stream.write(frame(payload))
            except trio.Cancelled:
                # Cancelled mid-write, the stream may hold half a frame: the next frame on it
                # would be read as garbage, so it is never used again.
                self._out.pop(peer_id, None)
                if stream is not None:
                    with trio.CancelScope(shield=True), suppress(Exception):
                        with trio.move_on_after(1):
                            await stream.reset()
                raise
            except (Exception, trio.TooSlowError) as exc:
                self._out.pop(peer_id, None)
                if stream is not None:
                    with suppress(Exception):
                        await stream.reset()
                raise PeerUnreachable(f"sending to {peer_id} failed: {exc or 'timeout'}") from None

    # -- data plane ---------------------------------------------------------------------------
    async def _open_fast(self, peer_id: str, protocol: str) -> Stream:
        raw = await self._host.new_stream(ID.from_base58(peer_id), [DATAPLANE_PROTOCOL])
        try:
            await raw.write(frame(cbor2.dumps({"protocol": protocol})))
            raw_reply = wire.loads(await FrameReader(raw.read, 4096).read_frame())
            remote = raw.get_remote_address()
        finally:
            with suppress(Exception):
                await raw.close()
        try:
            reply = dataplane.Ticket.from_obj(raw_reply)
        except wire.BadMessage as exc:
            raise PeerUnreachable(f"{peer_id} offers no data plane: {exc}") from None
        if not remote:
            raise PeerUnreachable("remote address unknown")
        return await dataplane.connect(remote[0], reply.port, peer_id, reply.ticket, reply.key)

    async def _on_dataplane_request(self, stream: Any) -> None:
        pid = str(stream.muxed_conn.peer_id)
        try:
            if pid not in self._admitted or self._dataplane is None:
                raise ValueError("not admitted" if pid not in self._admitted else "no data plane")
            with trio.fail_after(self._timeout):
                protocol = dataplane.ticket_request(
                    wire.loads(await FrameReader(stream.read, 4096).read_frame())
                )
                if protocol not in FAST_PROTOCOLS or protocol not in self._handlers:
                    raise ValueError(f"no fast path for {protocol!r}")
                ticket, key = self._dataplane.issue(pid, protocol)
                reply = dataplane.Ticket(self._dataplane.port, ticket, key)
                await stream.write(frame(cbor2.dumps(reply.to_obj())))
        except Exception as exc:
            with suppress(Exception):
                await stream.write(frame(cbor2.dumps({"error": str(exc)})))
        finally:
            with suppress(Exception):
                await stream.close()

    async def _dispatch_fast(self, protocol: str, stream: Stream) -> None:
        handler = self._handlers.get(protocol)
        if handler is not None and stream.peer_id in self._admitted:
            # Handlers run in the data plane's nursery: one that fails must cost its stream
            # only, never the listener (and with it the daemon).
            await contain(protocol, stream.peer_id, handler, stream)

    # -- admission ----------------------------------------------------------------------------
    def _guard_inbound(self, network: Any) -> None:
        """Report inbound connections that fail the secure handshake (wrong secret, plaintext)."""
        original = network.upgrade_inbound_raw_conn

        async def guarded(raw_conn: Any, maddr: Any) -> Any:
            try:
                return await original(raw_conn, maddr)
            except Exception as exc:
                remote = None
                with suppress(Exception):
                    host, port = raw_conn.get_remote_address()
                    remote = f"{host}:{port}"
                self.log.warning(
                    "admission_refused",
                    direction="inbound",
                    remote=remote,
                    detail=_root_cause(exc),
                    reason="secure handshake failed: wrong mesh secret, plaintext, "
                    "or not a meshllm peer",
                )
                raise

        network.upgrade_inbound_raw_conn = guarded

    def _on_connected(self, pid: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._expect_admission, pid)

    async def _expect_admission(self, pid: str) -> None:
        await trio.sleep(self._timeout * 2)
        if pid not in self._admitted and self._host.get_network().get_connections(
            ID.from_base58(pid)
        ):
            self.log.warning("admission_refused", other=pid, reason="never completed the challenge")
            await self.drop(pid)

    def _on_disconnected(self, pid: str) -> None:
        if not self._host.get_network().get_connections(ID.from_base58(pid)):
            self._admitted.discard(pid)
            self._out.pop(pid, None)
            self.log.info("peer_disconnected", other=pid)

    async def drop(self, pid: str) -> None:
        self._admitted.discard(pid)
        self._out.pop(pid, None)
        with suppress(Exception), trio.move_on_after(2):
            await self._host.disconnect(ID.from_base58(pid))

    # -- control messages ---------------------------------------------------------------------
    async def _on_ctl_stream(self, stream: Any) -> None:
        pid = str(stream.muxed_conn.peer_id)
        if pid not in self._admitted:
            self.log.warning(
                "stream_refused", other=pid, protocol=CTL_PROTOCOL, reason="not admitted"
            )
            with suppress(Exception):
                await stream.reset()
            return
        reader = FrameReader(stream.read, MAX_CONTROL_FRAME)
        try:
            while True:
                data = await reader.read_frame()
                try:
                    self._send_ch.send_nowait(Message(pid, data))
                except trio.WouldBlock:
                    self.log.warning("message_dropped", other=pid, reason="receive queue full")
        except FrameError as exc:
            self.log.warning("stream_dropped", other=pid, reason=str(exc))
        except Exception:
            pass  # EOF or reset: the sender closed or went away
        finally:
            with suppress(Exception):
                await stream.reset()


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of a libp2p error chain, which is the informative one."""
    seen = 0
    while seen < 16 and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return f"{type(exc).__name__}: {exc}"[:200]


class _P2PStream:
    """A libp2p stream behind the transport-neutral Stream interface."""

    def __init__(self, peer_id: str, raw: Any):
        self.peer_id = peer_id
        self._raw = raw
        self._closed = False

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self._raw.read(max_bytes)
        except StreamEOF:
            return b""
        except Exception as exc:
            raise PeerUnreachable(f"stream from {self.peer_id} broke: {exc}") from None

    async def write(self, data: bytes) -> None:
        try:
            await self._raw.write(data)
        except Exception as exc:
            raise PeerUnreachable(f"stream to {self.peer_id} broke: {exc}") from None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with suppress(Exception):
                await self._raw.close()


def _remote_peer(stream: Any) -> str:
    return str(stream.muxed_conn.peer_id)
