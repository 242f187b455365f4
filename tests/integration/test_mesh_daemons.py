"""Real daemon processes, real libp2p over loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import trio

from meshllm import testbed
from meshllm.mesh.identity import JoinToken
from tests.integration.mesh_helpers import agreement, cli, cli_status, status, wait_for


@pytest.fixture
def mesh4(mesh):
    """Four daemons, each joined through the previous one (a single join chain)."""
    t0 = time.monotonic()
    with mesh(4) as m:
        members, leader = wait_for(lambda: agreement(m.homes), timeout=20)
        yield {
            "root": m.root,
            "peers": m.peers,
            "homes": m.homes,
            "formed_s": time.monotonic() - t0,
            "members": members,
            "leader": leader,
        }


def test_four_peers_agree_on_members_and_one_leader(mesh4):
    homes = mesh4["homes"]
    views = [cli_status(h) for h in homes]
    ids = sorted(v["self"]["id"] for v in views)
    assert all(v["members"] == ids for v in views)
    leaders = [v for v in views if v["self"]["role"] == "leader"]
    assert len(leaders) == 1 and leaders[0]["self"]["id"] == mesh4["leader"]
    assert all(v["leader"] == mesh4["leader"] for v in views)
    # peer-3 joined through peer-2 only, yet knows and talks to peer-0.
    p3 = {p["id"]: p for p in views[3]["peers"]}
    assert p3[views[0]["self"]["id"]]["alive"] and p3[views[0]["self"]["id"]]["connected"]
    print(f"\nmesh of 4 formed in {mesh4['formed_s']:.2f} s")
    # The daemon logs at its config's [log] level (info by default), one JSON object a line.
    lines = (homes[0] / "daemon.log").read_text().splitlines()
    events = [json.loads(x) for x in lines if x.startswith("{")]
    assert any(e.get("event") == "daemon_ready" and e["level"] == "info" for e in events)


def test_new_leader_within_5s_after_sigkill(mesh4):
    homes, peers = mesh4["homes"], mesh4["peers"]
    old = mesh4["leader"]
    victim = next(p for p, h in zip(peers, homes, strict=True) if status(h)["self"]["id"] == old)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rest = [h for p, h in zip(peers, homes, strict=True) if p is not victim]
    members, leader = wait_for(lambda: agreement(rest), timeout=5)
    took = time.monotonic() - killed_at
    assert leader != old and old not in members and len(members) == 3
    print(f"\nnew leader agreed {took:.2f} s after SIGKILL")
    for h in rest:
        dead = next(p for p in status(h)["peers"] if p["id"] == old)
        assert dead["alive"] is False


def test_wrong_secret_is_refused_fast_and_never_a_member(mesh4, tmp_path):
    stranger = tmp_path / "stranger"
    cli(stranger, "init", "--name", "stranger")
    proc = testbed.start_daemon(stranger)
    try:
        testbed.wait_ready(stranger, proc)
        target = status(mesh4["homes"][0])["self"]["addrs"][0]
        t0 = time.monotonic()
        res = cli(stranger, "peers", "add", target, check=False)
        took = time.monotonic() - t0
        assert res.returncode == 1
        assert "different mesh secret" in res.stderr and "Traceback" not in res.stderr
        # Within 2 s of handshake timeout, plus the CLI's own start-up.
        assert took < 2.0 + 1.5, took
        me = status(stranger)["self"]["id"]
        log0 = (mesh4["homes"][0] / "daemon.log").read_text()
        assert "admission_refused" in log0
        time.sleep(2)
        for h in mesh4["homes"]:
            st = status(h)
            assert me not in st["members"] and me not in {p["id"] for p in st["peers"]}
    finally:
        proc.terminate()
        proc.wait(10)


def test_join_token_round_trip(mesh4, tmp_path):
    token = cli(mesh4["homes"][1], "invite").stdout.strip()
    decoded = JoinToken.decode(token)
    assert decoded.addrs == tuple(status(mesh4["homes"][1])["self"]["addrs"])
    newcomer = tmp_path / "newcomer"
    cli(newcomer, "join", token)
    proc = testbed.start_daemon(newcomer)
    try:
        testbed.wait_ready(newcomer, proc)
        wait_for(lambda: agreement([*mesh4["homes"], newcomer]), timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)


async def test_plaintext_dialer_cannot_connect(mesh4):
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux
    from multiaddr import Multiaddr

    from meshllm.mesh.identity import MeshSecret

    home = mesh4["homes"][0]
    target = status(home)["self"]["addrs"][0]
    key = create_new_key_pair(seed=b"p" * 32)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    for psk in (None, MeshSecret.load(home).pnet_key.hex()):  # even with the network key
        host = new_host(
            key_pair=key,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            psk=psk,
            listen_addrs=listen,
        )
        async with host.run(listen_addrs=listen):
            await host.get_network().auto_connector.stop()
            with pytest.raises(Exception) as info, trio.fail_after(10):
                await host.connect(info_from_p2p_addr(Multiaddr(target)))
            assert not isinstance(info.value, trio.TooSlowError) or psk is None
            assert not host.get_connected_peers()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.close()
    assert status(home) is not None


def _raw_control(home: Path, payload: bytes) -> list[dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(home / "control.sock"))
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    except BrokenPipeError:
        pass  # the daemon hung up on an oversized request; its error reply is still readable
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_malformed_control_requests_get_error_objects(mesh4):
    home = mesh4["homes"][2]
    mode = stat.S_IMODE((home / "control.sock").stat().st_mode)
    assert mode == 0o600
    cases = [
        (b"this is not json\n", "bad_json"),
        (b"[1, 2, 3]\n", "bad_request"),
        (b'{"v": 2, "op": "status"}\n', "unsupported_version"),
        (b'{"v": 1}\n', "bad_request"),
        (b'{"v": 1, "op": "launch_missiles"}\n', "unknown_op"),
        (b'{"v": 1, "op": "status", "args": []}\n', "bad_request"),
        (b'{"v": 1, "op": "peers.add", "args": {"addr": 5}}\n', "bad_request"),
        (b'{"v": 1, "op": "peers.add", "args": {"addr": "/ip4/1.2"}}\n', "unreachable"),
        (b"\xff\xfe\x00garbage\n", "bad_json"),
    ]
    for payload, code in cases:
        (reply,) = _raw_control(home, payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, (payload, reply)
        assert reply["error"]["message"]
    (reply,) = _raw_control(home, b'{"v":1,"id":7,"op":"status"}\n')
    assert reply["ok"] and reply["id"] == 7
    replies = _raw_control(home, b"x" * (2 << 20))
    assert replies[-1]["error"]["code"] == "too_large"
    st = status(home)
    assert st is not None and len(st["members"]) == 4


def test_stop_is_graceful(mesh4):
    home, peer = mesh4["homes"][3], mesh4["peers"][3]
    cli(home, "stop")
    wait_for(
        lambda: (
            not Path(f"/proc/{peer.pid}").exists()
            or b"(Z)" in Path(f"/proc/{peer.pid}/stat").read_bytes()[:64]
            or _zombie(peer.pid)
        ),
        timeout=10,
    )
    assert not (home / "control.sock").exists()
    res = cli(home, "status", check=False)
    assert res.returncode == 1 and "no daemon is running" in res.stderr


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_peers_add_with_the_secret_already_in_home(mesh4, tmp_path):
    home = tmp_path / "sibling"
    cli(home, "init", "--name", "sibling")
    shutil.copy(mesh4["homes"][0] / "secret", home / "secret")  # same mesh, no token
    proc = testbed.start_daemon(home)
    try:
        testbed.wait_ready(home, proc)
        target = status(mesh4["homes"][2])["self"]["addrs"][0]
        out = cli(home, "peers", "add", target)
        assert "connected to" in out.stdout
        wait_for(lambda: agreement([*mesh4["homes"], home]), timeout=10)
        listed = json.loads(cli(home, "peers", "--json").stdout)
        assert len(listed) == 4 and all(p["alive"] for p in listed)
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_phone_walkthrough_with_a_daemon_on_every_interface(tmp_path):
    """The README's walk-through: A listens on all interfaces, B joins with A's invite."""
    a, b = tmp_path / "phone-a", tmp_path / "phone-b"
    cli(a, "init", "--name", "phone-a", "--listen", "/ip4/0.0.0.0/tcp/0")
    procs = [testbed.start_daemon(a)]
    try:
        testbed.wait_ready(a, procs[0])
        token = cli(a, "invite").stdout.strip()
        addrs = JoinToken.decode(token).addrs
        # Dialable addresses only: the wildcard becomes this machine's addresses.
        assert addrs and not any("/0.0.0.0/" in x for x in addrs)
        assert any(x.startswith("/ip4/127.0.0.1/") for x in addrs)
        cli(b, "init", "--name", "phone-b", "--join", token)
        procs.append(testbed.start_daemon(b))
        testbed.wait_ready(b, procs[1])
        members, leader = wait_for(lambda: agreement([a, b]), timeout=15)
        names = {p["name"] for p in cli_status(b)["peers"]}
        assert names == {"phone-a"} and leader in members
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
