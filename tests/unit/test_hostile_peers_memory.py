"""A hostile admitted peer against a live victim (MeshNode + ServingService) on the in-memory
transport, and a stranger against the data port: each case named in the hostile-input issue,
then a generated batch over every protocol. After each, the victim is still running, still
hears its good peer, and has written nothing outside its home.
"""

from __future__ import annotations

import math
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

from meshllm.config import Config
from meshllm.mesh import dataplane
from meshllm.mesh.contain import contain
from meshllm.mesh.framing import frame
from meshllm.mesh.identity import MeshSecret
from meshllm.mesh.memory import MemoryNetwork, MemoryTransport
from meshllm.mesh.node import LEADER, MeshNode, encode_message
from meshllm.mesh.transport import Endpoint, EndpointOptions
from meshllm.pipeline.frames import ERROR, decode_frame
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.service import ServingService
from tests import hostile_values as hv

SECRET = MeshSecret(b"h" * 32)


@dataclass
class Mesh:
    victim: MeshNode
    service: ServingService
    good: MeshNode
    bad: Endpoint
    home: Path
    root: Path

    def outside_home(self) -> set[Path]:
        """Every path under the test's root that is not inside the victim's home."""
        return {p for p in self.root.rglob("*") if self.home not in (p, *p.parents)}


@asynccontextmanager
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    transport = MemoryTransport(MemoryNetwork())
    rng = random.Random(7)

    def endpoint() -> Endpoint:
        return transport.create_endpoint(EndpointOptions(rng.randbytes(32), SECRET, ()))

    home = tmp_path / "victim"
    home.mkdir()
    config = Config()
    v_ep, g_ep, b_ep = endpoint(), endpoint(), endpoint()
    victim = MeshNode(v_ep, config.mesh, name="victim", rng=random.Random(1))
    service = ServingService(home, config, v_ep, victim)
    good = MeshNode(g_ep, config.mesh, name="good", rng=random.Random(2))
    async with trio.open_nursery() as nursery:
        for ep in (v_ep, g_ep, b_ep):
            await nursery.start(ep.run)
        for task in (victim.run, service.run, good.run):
            await nursery.start(task)
        await good.add_peer(v_ep.listen_addrs()[0])
        await b_ep.dial(v_ep.listen_addrs()[0])
        m = Mesh(victim, service, good, b_ep, home, tmp_path)
        with trio.fail_after(30):
            while victim.current_leader() is None or not victim.peer_alive(good.peer_id):
                await trio.sleep(0.1)
        yield m
        nursery.cancel_scope.cancel()


async def still_well(m: Mesh, before: set[Path]) -> None:
    """The victim's tasks run (a crash would have ended the test's nursery), it keeps hearing
    its good peer and agrees with it on the leader, and nothing appeared outside its home."""
    with trio.fail_after(30):
        while not (
            m.victim.peer_alive(m.good.peer_id)
            and m.victim.current_leader() == m.good.current_leader() is not None
        ):
            await trio.sleep(0.1)
    assert m.outside_home() == before


def ctx_of(m: Mesh) -> hv.Context:
    return hv.Context(
        peers=(m.victim.peer_id, m.good.peer_id),
        me=m.bad.peer_id,
        source=m.bad.peer_id,
        addr=m.bad.listen_addrs()[0],
    )


async def send_ctl(m: Mesh, payload: bytes) -> None:
    await m.bad.send(m.victim.peer_id, payload)


async def send_stream(m: Mesh, protocol: str, data: bytes) -> bytes:
    """Write *data* on a fresh *protocol* stream to the victim; what comes back before it
    closes or goes quiet."""
    stream = await m.bad.open_stream(m.victim.peer_id, protocol)
    got = b""
    try:
        await stream.write(data)
        with trio.move_on_after(2):
            while chunk := await stream.read(65536):
                got += chunk
    except Exception:
        pass  # the victim closing the stream on us is the expected outcome
    finally:
        await stream.close()
    return got


def hb(m: Mesh, **fields: Any) -> dict[str, Any]:
    """A valid heartbeat of the hostile peer, with *fields* replaced."""
    base = hv.templates(ctx_of(m))["ctl.hb"]
    base.update(term=m.victim.term, x={})
    base.update(fields)
    return base


async def test_a_bignum_where_a_string_belongs(autojump_clock: Any, tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        huge = hv.bignum(10**5000 - 1)  # str() of it raises ValueError
        bad_hb = hv.cmap(
            *((hv.tstr(k), hv.encode(v)) for k, v in hb(m).items() if k != "name"),
            (hv.tstr("name"), huge),
        )
        ask = {"kind": "profile", "sha": "cd" * 32, "refresh": True}
        bad_body = hv.cmap(
            *((hv.tstr(k), hv.encode(v)) for k, v in ask.items()), (hv.tstr("source"), huge)
        )
        bad_app = hv.cmap(
            (hv.tstr("v"), hv.uint(1)),
            (hv.tstr("t"), hv.tstr("app")),
            (hv.tstr("term"), hv.uint(m.victim.term)),
            (hv.tstr("body"), bad_body),
        )
        for payload in (bad_hb, bad_app):
            await send_ctl(m, payload)
        await send_ctl(m, cbor2.dumps(hb(m)))  # a good one after it is still heard
        with trio.fail_after(10):
            while not m.victim.peer_alive(m.bad.peer_id):
                await trio.sleep(0.05)
        await still_well(m, before)


async def test_a_nul_in_a_plan_hash_and_a_plan_from_a_follower(
    autojump_clock: Any, tmp_path: Path
) -> None:
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        ctx = ctx_of(m)
        poisoned = {**hv.plan_obj(ctx, epoch=7), "model_sha": "ab" * 31 + "a\0"}
        await send_ctl(m, cbor2.dumps(hb(m, x={"plan": poisoned})))
        # Well-formed, but published by a peer that does not lead: never adopted.
        valid = hv.plan_obj(ctx, epoch=9)
        for _ in range(5):
            await send_ctl(m, cbor2.dumps(hb(m, x={"plan": valid, "staged": valid})))
            await trio.sleep(0.3)
        assert m.service.state.plan is None
        # State that does not decode costs the sender its state, not its membership.
        assert m.victim.peer_alive(m.bad.peer_id)
        await still_well(m, before)


async def test_an_epoch_at_the_end_of_the_range_is_not_credible(
    autojump_clock: Any, tmp_path: Path
) -> None:
    """A follower publishing epoch 2**62 - 1 would make the leader's next plan 2**62, which
    no peer decodes: every leader would then look dead in turn."""
    async with mesh(tmp_path) as m:
        last = hv.plan_obj(ctx_of(m), epoch=2**62 - 1)
        await send_ctl(m, cbor2.dumps(hb(m, x={"plan": last})))
        with trio.fail_after(10):
            while m.service.state.state_of(m.bad.peer_id).plan is None:
                await trio.sleep(0.05)
        assert m.service.leader.max_epoch_seen() == 0


async def test_a_frame_that_does_not_decode_is_answered(
    autojump_clock: Any, tmp_path: Path
) -> None:
    """Its coordinator hears why at once, instead of waiting out its step timeout."""
    async with mesh(tmp_path) as m:
        answers: list[Any] = []

        async def coordinator(stream: Any) -> None:
            answers.append(await stream.read(65536))

        m.bad.set_stream_handler("act", coordinator)
        fwd = {**hv.templates(ctx_of(m))["act.fwd.open"], "sm": {"top_k": 2**40}}
        await send_stream(m, "act", frame(cbor2.dumps(fwd)))
        with trio.fail_after(10):
            while not answers:
                await trio.sleep(0.05)
        reply = decode_frame(answers[0][4:])
        assert reply.kind == ERROR and reply.rid == fwd["r"] and "top_k" in reply.error


async def test_a_member_away_for_long_rejoins(autojump_clock: Any, tmp_path: Path) -> None:
    """Members heard from directly are never forgotten: a phone off the network for longer
    than forget_after_s is redialled and rejoins when it is back."""
    transport = MemoryTransport(MemoryNetwork())
    seeds = [bytes([i]) * 32 for i in (1, 2)]
    config = Config()

    async def peer(
        seed: bytes, scope: trio.CancelScope, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        ep = transport.create_endpoint(EndpointOptions(seed, SECRET, ()))
        node = MeshNode(ep, config.mesh, rng=random.Random(seed))
        with scope:
            async with trio.open_nursery() as inner:
                await inner.start(ep.run)
                await inner.start(node.run)
                task_status.started(node)

    async with trio.open_nursery() as nursery:
        a = await nursery.start(peer, seeds[0], trio.CancelScope())
        away = trio.CancelScope()
        b = await nursery.start(peer, seeds[1], away)
        await a.add_peer(b.endpoint.listen_addrs()[0])
        with trio.fail_after(10):
            while not a.peer_alive(b.peer_id):
                await trio.sleep(0.05)
        away.cancel()
        await trio.sleep(a.forget_after_s * 3)
        assert b.peer_id in a.peers  # kept, and redialled
        back = await nursery.start(peer, seeds[1], trio.CancelScope())
        with trio.fail_after(60):
            while not (a.peer_alive(back.peer_id) and back.peer_alive(a.peer_id)):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "sha", ["../../escape", "/tmp/escape", "ab" * 31 + "/.", "AB" * 32, "cd" * 32 + "/.."]
)
async def test_a_model_hash_never_builds_a_path(
    autojump_clock: Any, tmp_path: Path, sha: str
) -> None:
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        ctx = ctx_of(m)
        profile = {"kind": "profile", "sha": sha, "source": ctx.source, "refresh": True}
        await send_ctl(m, encode_message("app", m.victim.term, body=profile))
        plan = {**hv.plan_obj(ctx, epoch=3), "model_sha": sha}
        await send_ctl(m, cbor2.dumps(hb(m, role=LEADER, x={"plan": plan})))
        await trio.sleep(2)
        assert m.service.state.plan is None
        assert not (m.home / "cache").exists() or not any((m.home / "cache").iterdir())
        await still_well(m, before)


async def test_a_source_that_serves_an_empty_manifest(autojump_clock: Any, tmp_path: Path) -> None:
    """A profile request naming the hostile peer as the source of a model: it serves
    ``manifest.json`` as ``{}`` (and anything else for the rest). The victim refuses it, says
    why, and keeps nothing it fetched under that model's hash."""
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        sha = "cd" * 32

        async def serve_junk(stream: Any) -> None:
            body = b"{}"
            digest = __import__("hashlib").sha256(body).hexdigest()
            await stream.read(4096)
            await stream.write(
                frame(cbor2.dumps({"ok": True, "size": len(body), "sha256": digest})) + body
            )

        m.bad.set_stream_handler("files", serve_junk)
        body = {"kind": "profile", "sha": sha, "source": m.bad.peer_id, "refresh": True}
        await send_ctl(m, encode_message("app", m.victim.term, body=body))
        with trio.fail_after(30):
            while sha not in m.service.profiler.errors:
                await trio.sleep(0.1)
        assert "manifest" in m.service.profiler.errors[sha]
        meta = m.home / "cache" / sha / "meta"
        assert not (meta / "manifest.json").exists()
        await still_well(m, before)


async def test_infinity_in_a_frame_and_a_file_request(autojump_clock: Any, tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        t = hv.templates(ctx_of(m))
        fwd = {**t["act.fwd.open"], "sm": {"temperature": math.inf}}
        await send_stream(m, "act", frame(cbor2.dumps(fwd)))
        reply = await send_stream(
            m, "files", frame(cbor2.dumps({**t["files"], "offset": math.inf}))
        )
        header = cbor2.loads(reply[4:])
        assert header["ok"] is False and "offset" in header["error"]
        await still_well(m, before)


async def test_members_named_by_a_peer_are_bounded_and_forgotten(
    autojump_clock: Any, tmp_path: Path
) -> None:
    async with mesh(tmp_path) as m:
        rng = random.Random(3)
        for _ in range(8):  # 8 x 200 made-up members, each with an address to redial
            fake = {
                f"fake{rng.getrandbits(64):x}": [f"/ip4/10.9.9.9/tcp/1/p2p/x{i}"]
                for i in range(200)
            }
            await send_ctl(m, cbor2.dumps(hb(m, members=fake)))
            await trio.sleep(0.05)
        assert len(m.victim.peers) <= 256
        assert any(p.startswith("fake") for p in m.victim.peers)
        await trio.sleep(m.victim.forget_after_s + 5)
        assert not any(p.startswith("fake") for p in m.victim.peers)
        assert m.victim.peer_alive(m.good.peer_id)


async def test_a_handler_that_raises_costs_its_stream_only(autojump_clock: Any) -> None:
    transport = MemoryTransport(MemoryNetwork())
    rng = random.Random(5)
    a, b = (
        transport.create_endpoint(EndpointOptions(rng.randbytes(32), SECRET, ())) for _ in range(2)
    )
    served = []

    async def handler(stream: Any) -> None:
        data = await stream.read(100)
        if data == b"boom":
            raise ValueError("a bug, or a value nobody checked")
        served.append(data)

    a.set_stream_handler("x", handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await b.dial(a.listen_addrs()[0])
        for data in (b"boom", b"fine"):
            s = await b.open_stream(a.peer_id, "x")
            await s.write(data)
            await s.close()
        with trio.fail_after(5):
            while served != [b"fine"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_contain_lets_cancellation_through() -> None:
    async def forever() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.05) as scope:
        await contain("test", None, forever)
    assert scope.cancelled_caught


async def test_resets_on_the_data_port_cost_nothing() -> None:
    """Anyone can reach the data port: connect, send a few bytes, reset (SO_LINGER 0). The
    listener survives every one and still serves a ticketed link."""
    got: list[bytes] = []

    async def dispatch(protocol: str, stream: dataplane.EncryptedStream) -> None:
        got.append(await stream.read(100))

    listener = dataplane.DataPlaneListener("127.0.0.1", dispatch)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.run)
        for i in range(40):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"\x00\x01\x02"[: 1 + i % 3])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await trio.sleep(0)
        ticket, key = listener.issue("peer", "act")
        link = await dataplane.connect("127.0.0.1", port, "peer", ticket, key)
        await link.write(b"hello")
        with trio.fail_after(10):
            while got != [b"hello"]:
                await trio.sleep(0.01)
        await link.close()
        nursery.cancel_scope.cancel()


PROTOCOL_OF = {"ctl": None, "act": "act", "files": "files", "kv": "kv", "probe": "probe"}


async def test_a_generated_batch_over_every_protocol(autojump_clock: Any, tmp_path: Path) -> None:
    """Hundreds of generated hostile messages on each protocol the victim serves; framing
    attacks on its streams too."""
    async with mesh(tmp_path) as m:
        before = m.outside_home()
        rng = random.Random(25)
        templates = hv.templates(ctx_of(m))
        sent = 0
        for name, template in templates.items():
            kind = name.split(".")[0]
            if kind not in PROTOCOL_OF:
                continue
            for case in hv.hostile_cases(rng, template, 60, protocol=name):
                if kind == "ctl":
                    await send_ctl(m, case.data)
                else:
                    _how, wire_bytes = hv.frame_attacks(rng, case.data)
                    await send_stream(m, PROTOCOL_OF[kind], wire_bytes)
                sent += 1
        assert sent >= 1000
        await still_well(m, before)


async def test_what_a_service_publishes_decodes(autojump_clock: Any, tmp_path: Path) -> None:
    """The typed decoder accepts what a real service puts on its heartbeats (an error state
    with a long detail included: display text is clipped, never a reason to drop a peer)."""
    async with mesh(tmp_path) as m:
        m.service.state.set_state("error", detail="x" * 5000)
        state = PeerState.from_obj(cbor2.loads(cbor2.dumps(m.service.published())))
        assert state.serving["state"] == "error" and len(state.serving["detail"]) == 2000
        assert state.rss_mb is None or state.rss_mb > 0
