"""Garbage on a live daemon's control socket: every line gets an error reply (or, past the size
limit, a reply and a hang-up), nothing hangs, and afterwards the daemon still answers and its
mesh still has both members.

Seeded ``random`` rather than hypothesis: each example costs a round trip to a real process,
and a fixed seed keeps a failure reproducible.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

from meshllm import testbed
from meshllm.control.client import call
from meshllm.control.protocol import MAX_LINE, SOCKET_NAME

SEED = 20240611
LINES = 400
REPLY_TIMEOUT_S = 10.0
# Read-only operations only: garbage args to "stop", "serve" or "peers.add" could legitimately
# change the daemon, which is not what this test is about.
SAFE_OPS = ("status", "peers")


def _junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**63, 1e308, -0.0])
    if kind == 1:
        return rng.randrange(-(2**70), 2**70)
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 4:
        return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_junk_value(rng, depth + 1))[:8]: _junk_value(rng, depth + 1) for _ in range(3)}


def garbage_line(rng: random.Random) -> bytes:
    """One request line's worth of garbage, without its newline."""
    kind = rng.randrange(10)
    if kind == 0:  # binary junk, invalid UTF-8 likely
        line = rng.randbytes(rng.randrange(1, 300))
    elif kind == 1:  # broken JSON
        text = json.dumps({"v": 1, "id": 1, "op": "status"})
        cut = rng.randrange(1, len(text))
        line = (text[:cut] + rng.choice(["", "}", "{", '"', "\\", "]]"])).encode()
    elif kind == 2:  # wrong or missing versions
        line = json.dumps({"v": rng.choice([0, 2, -1, "1", 1.5, None, [1]]), "op": "status"})
        line = line.encode()
    elif kind == 3:  # unknown ops and ops of the wrong type
        op = rng.choice([f"x-{rng.random()}", "", 7, None, ["status"], {"op": "status"}])
        line = json.dumps({"v": 1, "id": rng.random(), "op": op}).encode()
    elif kind == 4:  # the right outer shape, junk inside, on read-only ops
        obj = {"v": 1, "id": _junk_value(rng), "op": rng.choice(SAFE_OPS)}
        obj["args"] = rng.choice([_junk_value(rng), {"x": _junk_value(rng)}])
        line = json.dumps(obj).encode()
    elif kind == 5:  # JSON that is not an object
        line = json.dumps(_junk_value(rng)).encode()
    elif kind == 6:  # numbers over Python's 4300-digit limit for int parsing
        digits = "9" * rng.randrange(4301, 20000)
        line = f'{{"v": 1, "op": "status", "id": {digits}}}'.encode()
    elif kind == 7:  # nesting deeper than the parser's recursion limit
        n = rng.randrange(2000, 50000)
        line = b'{"v": 1, "op": "status", "args": ' + b"[" * n + b"]" * n + b"}"
    elif kind == 8:  # a lone surrogate and NUL bytes in strings
        line = b'{"v": 1, "op": "\\ud800\\u0000", "id": "\\udfff"}'
    else:  # random printable noise
        line = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 200)))
    # One line each: an embedded newline would split it into several requests, and a blank
    # line gets no reply at all (the server skips it), so make sure neither happens.
    line = line.replace(b"\n", b" ").replace(b"\r", b" ")
    return line if line.strip() else b"?" + line


class Conn:
    """A control-socket connection that reconnects after the daemon hangs up."""

    def __init__(self, path: Path):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def _open(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(REPLY_TIMEOUT_S)  # a hang fails the test instead of blocking
            self.sock.connect(str(self.path))
            self.buf = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, line: bytes, end: bytes = b"\n") -> dict[str, Any] | None:
        """Send one line; the daemon's reply, or None if it hung up without one."""
        sock = self._open()
        try:
            sock.sendall(line + end)
            while b"\n" not in self.buf:
                chunk = sock.recv(65536)
                if not chunk:
                    self.close()
                    return None
                self.buf += chunk
        except (BrokenPipeError, ConnectionResetError):
            self.close()
            return None
        reply, self.buf = self.buf.split(b"\n", 1)
        return json.loads(reply)


def check_reply(reply: dict[str, Any], line: bytes) -> None:
    assert reply.get("v") == 1, (line[:200], reply)
    if reply.get("ok"):
        # Only a read-only op with ignorable args may succeed.
        assert any(op.encode() in line for op in SAFE_OPS), (line[:200], reply)
    else:
        err = reply["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str), reply


def test_control_socket_survives_garbage(tmp_path: Path) -> None:
    root = tmp_path / "tb"
    peers = testbed.up(root, 2)
    try:
        home = Path(peers[0].home)
        path = home / SOCKET_NAME
        rng = random.Random(SEED)
        conn = Conn(path)
        try:
            errors = 0
            for _ in range(LINES):
                line = garbage_line(rng)
                reply = conn.request(line)
                # Lines under the limit always get a reply; the connection stays usable.
                assert reply is not None, f"no reply to {line[:200]!r}"
                check_reply(reply, line)
                errors += not reply.get("ok")
            assert errors > LINES // 2  # the generator really produced mostly bad requests
        finally:
            conn.close()

        # Over the size limit: a "too_large" error, then the daemon hangs up.
        for filler in (b"x", b"{" * 7, b"\xff\xfe"):
            conn = Conn(path)
            try:
                # No newline: one arriving with the last chunk would end the line before the
                # server checks its length, and the answer would be bad_json instead.
                reply = conn.request(filler * (MAX_LINE // len(filler) + 65536), end=b"")
                assert reply is not None and reply["error"]["code"] == "too_large", reply
                assert conn.request(b'{"v": 1, "op": "status"}') is None  # hung up
            finally:
                conn.close()

        # A partial line, then the client vanishes: nothing to answer, nothing to break.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(b'{"v": 1, "op": "sta')

        # Still serving, on a fresh connection, and still part of the same two-peer mesh.
        status = call(home, "status", timeout=10)
        assert len(status["members"]) == 2, status["members"]
        other = call(Path(peers[1].home), "status", timeout=10)
        assert len(other["members"]) == 2, other["members"]
    finally:
        testbed.down(root)
