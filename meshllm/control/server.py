"""The daemon side of the control socket (trio)."""

from __future__ import annotations

import errno
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from meshllm.control.protocol import (
    MAX_LINE,
    ControlError,
    error,
    event,
    ok,
    parse_request,
    request_id,
)
from meshllm.errors import MeshError, Refused

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Emit = Callable[[dict[str, Any]], Awaitable[None]]
StreamingHandler = Callable[[dict[str, Any], Emit], Awaitable[Any]]
log = structlog.get_logger("meshllm.control")


class DaemonAlreadyRunning(MeshError):
    """Another daemon answers on this home's control socket."""


def _socket_in_use(path: Path) -> bool:
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlServer:
    """Serves the explicitly registered operations, one JSON line per request."""

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        streaming: dict[str, StreamingHandler] | None = None,
    ):
        self.path = path
        self.handlers = handlers
        # Operations that send event lines ({"v", "id", "event"}) before their final answer.
        self.streaming = streaming or {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.path.exists():
            if _socket_in_use(self.path):
                raise DaemonAlreadyRunning(
                    f"a daemon is already running for this home ({self.path} answers)"
                )
            self.path.unlink()  # stale, left by a daemon that died
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)  # owner-only from the moment the socket file exists
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._serve, [listener], handler_nursery=nursery)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                self.path.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    async def _serve(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            await stream.send_all(await self._respond(line, stream))
                    if len(buf) > MAX_LINE:
                        err = ControlError("too_large", f"request line over {MAX_LINE} bytes")
                        await stream.send_all(error(None, err))
                        await self._discard_rest(stream)
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer

    @staticmethod
    async def _discard_rest(stream: trio.SocketStream) -> None:
        """Hang up politely: closing with unread input would reset the client before it can
        read our error reply."""
        await stream.send_eof()
        with trio.move_on_after(2):
            while await stream.receive_some(1 << 16):
                pass

    async def _respond(self, line: bytes, stream: trio.SocketStream) -> bytes:
        try:
            req = parse_request(line)
        except ControlError as err:
            log.info("control_request_rejected", code=err.code)
            return error(request_id(line), err)
        handler = self.handlers.get(req.op)
        streaming = self.streaming.get(req.op)
        if handler is None and streaming is None:
            known = ", ".join(sorted([*self.handlers, *self.streaming]))
            return error(
                req.id, ControlError("unknown_op", f"unknown op {req.op!r}; known: {known}")
            )

        async def emit(event_obj: dict[str, Any]) -> None:
            await stream.send_all(event(req.id, event_obj))

        try:
            if streaming is not None:
                return ok(req.id, await streaming(req.args, emit))
            assert handler is not None
            return ok(req.id, await handler(req.args))
        except ControlError as err:
            return error(req.id, err)
        except Refused as exc:  # the serving layer's own reasons, with their codes
            return error(req.id, ControlError(exc.code, str(exc)))
        except MeshError as exc:
            return error(req.id, ControlError("failed", str(exc)))
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("control_handler_failed", op=req.op)
            return error(req.id, ControlError("internal", f"{type(exc).__name__}: {exc}"))
