"""The CLI side of the control socket: blocking, one request per call."""

from __future__ import annotations

import itertools
import json
import socket
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
        req_id = next(_ids)
        req = {"v": VERSION, "id": req_id, "op": op, "args": args}
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise MeshError(f"the daemon closed the connection during {op!r}")
            buf += chunk
    except TimeoutError:
        raise MeshError(f"the daemon did not answer {op!r} within {timeout:.0f} s") from None
    finally:
        sock.close()
    resp = json.loads(buf.split(b"\n", 1)[0])
    if not resp.get("ok"):
        err = resp.get("error") or {}
        raise RequestFailed(err.get("code", "unknown"), err.get("message", "request failed"))
    return resp.get("result")
