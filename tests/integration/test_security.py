"""Outsiders get nothing from real daemons: no meshllm protocol, no segment bytes, no ticket.

test_mesh_daemons.py already checks that a whole daemon with a wrong secret is refused by
`peers add` and never becomes a member, and that a plaintext dialer cannot connect. This file
goes one level down, with libp2p endpoints built in the test process exactly as the daemon
builds them, and asks every protocol a daemon serves directly:

* an outsider with a fresh mesh secret (wrong private-network key, wrong auth key) never gets a
  connection, so no protocol can even be negotiated;
* an outsider that somehow holds the private-network key but not the auth key (the two keys
  are derived separately from the secret, so this can be built) gets a connection, fails the
  challenge in both directions, and every protocol it opens without admission is reset by the
  daemon before a byte of the request is read; the data-plane negotiation answers "not
  admitted" and no ticket;
* the data plane's raw TCP port closes on a connection without a valid ticket.

A positive control (an endpoint holding the real secret fetches the same segment with the same
request) shows the requests are well-formed, so a refusal is the guard and not a typo.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from meshllm import testbed
from meshllm.control.client import RequestFailed, call
from meshllm.mesh.framing import frame
from meshllm.mesh.identity import MeshSecret
from meshllm.mesh.p2p import AUTH_PROTOCOL, CTL_PROTOCOL, DATAPLANE_PROTOCOL, Libp2pEndpoint
from meshllm.mesh.transport import AdmissionRefused, EndpointOptions, PeerUnreachable
from meshllm.model.store import ImportedModel
from meshllm.pipeline import files
from tests.integration.mesh_helpers import (
    PnetOnly,
    agreement,
    listening_tcp_ports,
    running,
    status,
    wait_for,
)

HANDSHAKE_S = 2.0  # the daemons' [mesh] handshake_timeout_s (the default)
ATTEMPT_S = HANDSHAKE_S + 2.0  # long enough for a slow 2-core machine, short enough to fail fast
# Every application protocol a daemon serves (service.py, files.py, profiling.py) plus the
# membership/control one; the data-plane negotiation is checked separately (it answers).
APP_PROTOCOLS = ("act", "files", "probe", "kv")
GUARDED = [TProtocol(f"/meshllm/{p}/1.0.0") for p in APP_PROTOCOLS] + [CTL_PROTOCOL]


@pytest.fixture
def mesh2(tmp_path: Path, tiny_fp32: ImportedModel) -> Any:
    root = tmp_path / "tb"
    peers = testbed.up(root, 2)
    homes = [Path(p.home) for p in peers]
    try:
        members, _leader = wait_for(lambda: agreement(homes), timeout=20)
        # The file server lists its model store on every request: linking is enough.
        dest = homes[0] / "models" / tiny_fp32.name
        shutil.copytree(
            tiny_fp32.path,
            dest,
            copy_function=os.link,
            ignore=shutil.ignore_patterns("segments", "*.lock"),
        )
        target = status(homes[0])
        assert target is not None
        yield {
            "peers": peers,
            "homes": homes,
            "members": members,
            "model": tiny_fp32,
            "addr": target["self"]["addrs"][0],
            "pid": target["self"]["id"],
        }
    finally:
        testbed.down(root)


@asynccontextmanager
async def endpoint(secret: MeshSecret) -> AsyncIterator[Libp2pEndpoint]:
    """A running endpoint with its own fresh identity, built as meshllm.daemon builds one."""
    ep = Libp2pEndpoint(
        EndpointOptions(
            key_seed=secrets.token_bytes(32),
            secret=secret,
            listen=("/ip4/127.0.0.1/tcp/0",),
            handshake_timeout_s=HANDSHAKE_S,
        )
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(ep.run)
        yield ep
        nursery.cancel_scope.cancel()


async def raw_exchange(ep: Libp2pEndpoint, addr: str, proto: TProtocol, request: bytes) -> bytes:
    """Open *proto* at *addr* below the endpoint's own checks (raw libp2p host, no admission
    of ours), send *request*, return everything that comes back before the stream ends."""
    info = info_from_p2p_addr(Multiaddr(addr))
    host = ep._host
    with suppress(Exception):  # a failed earlier dial must not short-circuit this one
        host.get_network()._negative_peer_cache.evict(str(info.peer_id))
    host.get_peerstore().add_addrs(info.peer_id, info.addrs, 60)
    got = b""
    with trio.move_on_after(ATTEMPT_S):
        try:
            stream = await host.new_stream(info.peer_id, [proto])
            await stream.write(request)
            while chunk := await stream.read(65536):
                got += chunk
        except Exception:
            pass  # refused, reset or never connected: all mean "nothing for you"
    return got


def segment_request(model: ImportedModel) -> dict[str, Any]:
    return {
        "sha": model.manifest.model_sha256,
        "what": "segment",
        "start": 0,
        "stop": 2,
        "file": "segment.onnx.data",
    }


def requests_for(model: ImportedModel) -> dict[TProtocol, bytes]:
    files_req = frame(cbor2.dumps({**segment_request(model), "offset": 0}))
    junk = frame(cbor2.dumps({"t": "hb", "term": 99}))
    return {p: files_req if "files" in p else junk for p in GUARDED}


def refused_protocols(home: Path, other: str) -> set[str]:
    """Protocols the daemon's admission guard logged refusing for peer *other*."""
    out = set()
    for line in (home / "daemon.log").read_text(errors="replace").splitlines():
        with suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") == "stream_refused" and rec.get("other") == other:
                out.add(rec.get("protocol"))
    return out


def assert_mesh_intact(mesh: dict[str, Any], strangers: list[str]) -> None:
    for p in mesh["peers"]:
        assert running(p.pid), f"daemon {p.home} died"
    members, _ = wait_for(lambda: agreement(mesh["homes"]), timeout=10)
    assert members == mesh["members"] and len(members) == 2
    for h in mesh["homes"]:
        st = status(h)
        assert st is not None
        known = {p["id"] for p in st["peers"]}
        assert not known & set(strangers), "an outsider got into the peer table"


async def test_outsider_with_a_fresh_secret_gets_no_protocol(mesh2: dict[str, Any]) -> None:
    addr, target = mesh2["addr"], mesh2["pid"]
    async with endpoint(MeshSecret.generate()) as outsider:
        with trio.fail_after(ATTEMPT_S), pytest.raises((AdmissionRefused, PeerUnreachable)):
            await outsider.dial(addr)
        # The endpoint API refuses locally; the raw host must fail on the wire.
        for proto in (*APP_PROTOCOLS, "dataplane"):
            with trio.fail_after(ATTEMPT_S), pytest.raises(PeerUnreachable):
                await outsider.open_stream(target, proto)
        reqs = requests_for(mesh2["model"])
        reqs[DATAPLANE_PROTOCOL] = frame(cbor2.dumps({"protocol": "act"}))
        reqs[AUTH_PROTOCOL] = frame(cbor2.dumps({"v": 1, "nonce": b"n" * 32}))
        got: dict[TProtocol, bytes] = {}

        async def attempt(proto: TProtocol, req: bytes) -> None:
            got[proto] = await raw_exchange(outsider, addr, proto, req)

        # All at once: each attempt can only end by its deadline (the handshake never does).
        async with trio.open_nursery() as nursery:
            for proto, req in reqs.items():
                nursery.start_soon(attempt, proto, req)
        assert got == dict.fromkeys(reqs, b"")
        # Not even a secured connection ever formed (the private network garbles the Noise
        # handshake), so the daemon had nothing to refuse at the protocol level.
        assert not outsider._host.get_network().get_connections(ID.from_base58(target))
        me = outsider.peer_id
    assert refused_protocols(mesh2["homes"][0], me) == set()
    assert_mesh_intact(mesh2, [me])


async def test_outsider_with_the_network_key_but_not_the_secret(mesh2: dict[str, Any]) -> None:
    home0, addr, target = mesh2["homes"][0], mesh2["addr"], mesh2["pid"]
    model = mesh2["model"]
    stolen = PnetOnly(secrets.token_bytes(32), stolen_pnet=MeshSecret.load(home0).pnet_key)
    assert stolen.pnet_key == MeshSecret.load(home0).pnet_key
    assert stolen.auth_key != MeshSecret.load(home0).auth_key
    strangers = []

    # As dialer: the connection forms, the challenge does not.
    async with endpoint(stolen) as outsider:
        strangers.append(outsider.peer_id)
        with trio.fail_after(ATTEMPT_S), pytest.raises(AdmissionRefused):
            await outsider.dial(addr)
        # As listener: the daemon dials it (peers.add) and refuses it too.
        back = outsider.listen_addrs()[0]
        with trio.fail_after(HANDSHAKE_S + 10), pytest.raises(RequestFailed) as info:
            await trio.to_thread.run_sync(
                lambda: call(home0, "peers.add", timeout=HANDSHAKE_S + 8, addr=back)
            )
        assert info.value.code == "refused", info.value

    # Skipping the challenge altogether: connect, then open every protocol unadmitted.
    async with endpoint(stolen) as sneak:
        strangers.append(sneak.peer_id)
        with trio.fail_after(ATTEMPT_S):
            await sneak._host.connect(info_from_p2p_addr(Multiaddr(addr)))
        assert sneak._host.get_network().get_connections(ID.from_base58(target))
        for proto, req in requests_for(model).items():
            assert await raw_exchange(sneak, addr, proto, req) == b"", proto
        reply = await raw_exchange(
            sneak, addr, DATAPLANE_PROTOCOL, frame(cbor2.dumps({"protocol": "act"}))
        )
        answer = cbor2.loads(reply[4:])  # one length-prefixed frame
        assert "ticket" not in answer and "key" not in answer
        assert answer.get("error") == "not admitted"

    refused = refused_protocols(home0, strangers[1])
    assert refused == {str(p) for p in GUARDED}, refused

    # Positive control: the same segment request, from an endpoint that holds the secret.
    async with endpoint(MeshSecret.load(home0)) as insider:
        with trio.fail_after(ATTEMPT_S):
            assert await insider.dial(addr) == target
        dest = home0.parent / "insider" / "segment.onnx.data"
        with trio.fail_after(60):
            await files.fetch_file(
                insider, target, files.FileRequest.from_obj(segment_request(model)), dest
            )
        assert dest.stat().st_size > 0

    assert_mesh_intact(mesh2, strangers)


async def test_data_port_closes_without_a_ticket(mesh2: dict[str, Any]) -> None:
    peer = mesh2["peers"][0]
    libp2p_port = int(Multiaddr(mesh2["addr"]).value_for_protocol("tcp"))
    data_ports = listening_tcp_ports(peer.pid) - {libp2p_port}
    assert data_ports, "the daemon's data-plane listener was not found"
    for port in data_ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            # A guessed ticket followed by a would-be record: closed, nothing answered.
            s.sendall(secrets.token_bytes(32) + b"\0\0\0\x10" + secrets.token_bytes(16))
            try:
                answer = s.recv(65536)
            except ConnectionResetError:
                answer = b""  # closed with our record unread: a reset, same verdict
            assert answer == b""
    assert_mesh_intact(mesh2, [])


def test_local_secrets_are_owner_only(mesh2: dict[str, Any]) -> None:
    for home in mesh2["homes"]:
        assert stat.S_IMODE((home / "control.sock").stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "identity.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
