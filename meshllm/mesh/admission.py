"""Admission: the mesh's challenge-response on every new libp2p connection.

Both sides prove they hold the mesh secret with HMACs over fresh nonces and both peer ids
(``/meshllm/auth/1.0.0``), so a peer id is bound to a key that knows the secret. Only an
admitted peer may open any other meshllm protocol; one that fails is disconnected.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from contextlib import suppress
from typing import Any, Protocol

import cbor2
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshllm import wire
from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.transport import AdmissionRefused

AUTH_PROTOCOL = TProtocol("/meshllm/auth/1.0.0")


class Host(Protocol):
    """What admission needs of the endpoint it guards."""

    host: Any  # the libp2p host
    peer_id: str
    log: Any
    timeout_s: float

    async def drop(self, pid: str) -> None: ...


def auth_message(obj: Any) -> dict[str, Any]:
    """One message of the mesh challenge, a small map (its fields are checked where read)."""
    return wire.mapping(obj, "message", 8)


class Admission:
    def __init__(self, endpoint: Host, auth_key: bytes):
        self._ep = endpoint
        self._key = auth_key
        self.admitted: set[str] = set()

    def _mac(self, role: bytes, dialer: str, listener: str, nd: bytes, nl: bytes) -> bytes:
        msg = b"|".join([b"meshllm-auth-v1", role, dialer.encode(), listener.encode(), nd, nl])
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    async def challenge(self, remote: ID) -> None:
        """Dialer side of the challenge-response."""
        pid = str(remote)
        stream = await self._ep.host.new_stream(remote, [AUTH_PROTOCOL])
        reader = FrameReader(stream.read, 4096)
        try:
            nd = secrets.token_bytes(32)
            await stream.write(frame(cbor2.dumps({"v": 1, "nonce": nd})))
            reply = auth_message(wire.loads(await reader.read_frame()))
            nl, ml = reply.get("nonce"), reply.get("mac")
            me = self._ep.peer_id
            good = isinstance(nl, bytes) and isinstance(ml, bytes)
            if not good or not hmac.compare_digest(ml, self._mac(b"L", me, pid, nd, nl)):
                self._ep.log.warning(
                    "admission_refused", other=pid, reason="it cannot prove the secret"
                )
                raise AdmissionRefused(f"peer {pid} does not hold the mesh secret")
            self.admitted.add(pid)
            await stream.write(frame(cbor2.dumps({"mac": self._mac(b"D", me, pid, nd, nl)})))
            verdict = auth_message(wire.loads(await reader.read_frame()))
            if verdict.get("ok") is not True:
                self.admitted.discard(pid)
                raise AdmissionRefused(f"peer {pid} refused us: {verdict.get('error', 'refused')}")
            self._ep.log.info("peer_admitted", other=pid, direction="outbound")
        except AdmissionRefused:
            await self._ep.drop(pid)
            raise
        except (EOFError, FrameError, ValueError, wire.BadMessage) as exc:
            self.admitted.discard(pid)
            await self._ep.drop(pid)
            raise AdmissionRefused(f"peer {pid} broke off the mesh challenge: {exc}") from None
        finally:
            with suppress(Exception):
                await stream.close()

    async def answer(self, stream: Any) -> None:
        """Listener side of the challenge-response."""
        pid = str(stream.muxed_conn.peer_id)
        reader = FrameReader(stream.read, 4096)
        try:
            with trio.fail_after(self._ep.timeout_s):
                hello = auth_message(wire.loads(await reader.read_frame()))
                nd = hello.get("nonce")
                if not isinstance(nd, bytes) or len(nd) != 32:
                    raise ValueError("bad challenge")
                nl = secrets.token_bytes(32)
                ml = self._mac(b"L", pid, self._ep.peer_id, nd, nl)
                await stream.write(frame(cbor2.dumps({"nonce": nl, "mac": ml})))
                answer = auth_message(wire.loads(await reader.read_frame()))
                md = answer.get("mac")
                expected = self._mac(b"D", pid, self._ep.peer_id, nd, nl)
                if not isinstance(md, bytes) or not hmac.compare_digest(md, expected):
                    await stream.write(
                        frame(cbor2.dumps({"ok": False, "error": "wrong mesh secret"}))
                    )
                    self._ep.log.warning("admission_refused", other=pid, reason="wrong mesh secret")
                    await self._ep.drop(pid)
                    return
                self.admitted.add(pid)
                await stream.write(frame(cbor2.dumps({"ok": True})))
                self._ep.log.info("peer_admitted", other=pid, direction="inbound")
        except (trio.TooSlowError, EOFError, FrameError, ValueError, wire.BadMessage) as exc:
            self._ep.log.warning("admission_refused", other=pid, reason=f"bad challenge: {exc}")
            await self._ep.drop(pid)
        except Exception as exc:  # stream reset and the like: the dialer gave up
            self._ep.log.info("auth_stream_failed", other=pid, reason=str(exc))
        finally:
            with suppress(Exception):
                await stream.close()
