"""The control socket server in-process: protocol errors, permissions, stale sockets."""

from __future__ import annotations

import json
import stat

import pytest
import trio

from meshllm.control.client import DaemonNotRunning, RequestFailed, call
from meshllm.control.protocol import ControlError, parse_request
from meshllm.control.server import ControlServer, DaemonAlreadyRunning
from meshllm.errors import MeshError


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{", "bad_json"),
        (b'"str"', "bad_request"),
        (b'{"v": 9, "op": "x"}', "unsupported_version"),
        (b'{"v": 1, "op": ""}', "bad_request"),
        (b'{"v": 1, "op": "x", "args": 3}', "bad_request"),
    ],
)
def test_parse_request_errors(line, code):
    with pytest.raises(ControlError) as info:
        parse_request(line)
    assert info.value.code == code


async def _boom(args):
    raise RuntimeError("bug")


async def _fail(args):
    raise MeshError("nope, clearly")


async def _echo(args):
    return args


async def test_server_answers_and_survives_handler_errors(tmp_path):
    server = ControlServer(tmp_path / "control.sock", {"echo": _echo, "boom": _boom, "fail": _fail})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        sock = tmp_path / "control.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        def client(op, **args):
            return call(tmp_path, op, timeout=5, **args)

        assert await trio.to_thread.run_sync(lambda: client("echo", a=1)) == {"a": 1}
        for op, code in (("boom", "internal"), ("fail", "failed"), ("missing", "unknown_op")):
            with pytest.raises(RequestFailed) as info:
                await trio.to_thread.run_sync(lambda op=op: client(op))
            assert info.value.code == code
        # Several requests on one connection, answered in order.
        stream = await trio.open_unix_socket(str(sock))
        await stream.send_all(b'{"v":1,"id":1,"op":"echo"}\nnot json\n{"v":1,"id":3,"op":"echo"}\n')
        data = b""
        while data.count(b"\n") < 3:
            data += await stream.receive_some(4096)
        replies = [json.loads(x) for x in data.splitlines()]
        assert [r["ok"] for r in replies] == [True, False, True]
        assert replies[0]["id"] == 1 and replies[2]["id"] == 3
        await stream.aclose()
        # A second server on the same home refuses to start.
        with pytest.raises(DaemonAlreadyRunning):
            await ControlServer(sock, {}).run()
        nursery.cancel_scope.cancel()
    assert not sock.exists()


async def test_stale_socket_is_replaced(tmp_path):
    sock = tmp_path / "control.sock"
    import socket as s

    stale = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(sock, {"echo": _echo}).run)
        assert await trio.to_thread.run_sync(lambda: call(tmp_path, "echo", x=2)) == {"x": 2}
        nursery.cancel_scope.cancel()


def test_client_without_daemon(tmp_path):
    with pytest.raises(DaemonNotRunning, match="no daemon is running"):
        call(tmp_path, "status")
