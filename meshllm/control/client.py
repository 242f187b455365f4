"""The CLI side of the control socket: blocking, one request per call."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshllm.control.protocol import SOCKET_NAME, VERSION
from meshllm.errors import MeshError

_ids = itertools.count(1)


class DaemonNotRunning(MeshError):
    """No daemon answers on the home's control socket."""


class RequestFailed(MeshError):
    """The daemon answered with an error object."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def call(home: Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """One request, one answer."""
    return call_stream(home, op, None, timeout=timeout, **args)


def call_stream(
    home: Path,
    op: str,
    on_event: Callable[[dict[str, Any]], None] | None,
    timeout: float = 30.0,
    **args: Any,
) -> Any:
    """One request; *on_event* gets each event line before the final answer, which is
    returned (or raised as RequestFailed). *timeout* bounds the wait for each line."""
    path = home / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"no daemon is running for {home} (start one with `meshllm daemon`)"
            ) from None
        req = {"v": VERSION, "id": next(_ids), "op": op, "args": args}
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise MeshError(f"the daemon closed the connection during {op!r}")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            resp = json.loads(line)
            if "event" in resp:
                if on_event is not None:
                    on_event(resp["event"])
                continue
            if not resp.get("ok"):
                err = resp.get("error") or {}
                raise RequestFailed(err.get("code", "unknown"), err.get("message", "failed"))
            return resp.get("result")
    except TimeoutError:
        raise MeshError(f"the daemon did not answer {op!r} within {timeout:.0f} s") from None
    finally:
        sock.close()
