"""serve as a request and a reply, on the in-memory transport with the autojump clock."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from meshllm.config import MeshSection
from meshllm.errors import MeshError
from meshllm.mesh.identity import MeshSecret
from meshllm.mesh.memory import MemoryNetwork, MemoryTransport
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.mesh.transport import EndpointOptions
from meshllm.pipeline import appmsg
from meshllm.pipeline.plan import Plan, Stage
from meshllm.pipeline.serve_desk import ServeDesk, ServeFailed, ServeTimeout, satisfies

CFG = MeshSection()


def a_plan(epoch: int, model: str = "m", partitioner: str = "even") -> Plan:
    return Plan(
        epoch=epoch,
        model=model,
        model_sha="ab" * 32,
        source="p",
        num_layers=4,
        partitioner=partitioner,
        stages=(Stage("p", 0, 4),),
        balance="none",
    )


@dataclass
class Peer:
    node: MeshNode
    desk: ServeDesk
    scope: trio.CancelScope
    live: Plan | None = None
    asked: list[appmsg.ServeAsk] = field(default_factory=list)
    # make_plan waits for this, then returns `epoch` (or raises `error`)
    release: trio.Event = field(default_factory=trio.Event)
    epoch: int = 5
    error: str | None = None


async def start_peers(nursery: trio.Nursery, n: int) -> list[Peer]:
    transport = MemoryTransport(MemoryNetwork())
    rng = random.Random(4)
    peers: list[Peer] = []
    for i in range(n):
        seed = rng.randbytes(32)
        ep = transport.create_endpoint(EndpointOptions(seed, MeshSecret(b"d" * 32), ()))
        node = MeshNode(ep, CFG, name=f"n{i}", rng=random.Random(seed))
        peer = Peer(node, None, trio.CancelScope())  # type: ignore[arg-type]

        async def make_plan(ask: appmsg.ServeAsk, peer: Peer = peer) -> int:
            peer.asked.append(ask)
            await peer.release.wait()
            if peer.error:
                raise MeshError(peer.error)
            return peer.epoch

        peer.desk = ServeDesk(node, make_plan, lambda peer=peer: peer.live)

        def on_app(sender: str, body: dict[str, Any], peer: Peer = peer) -> None:
            msg = appmsg.decode(body)
            if isinstance(msg, appmsg.ServeAsk):
                peer.desk.on_ask(sender, msg)
            elif isinstance(msg, appmsg.ServeReply):
                peer.desk.on_reply(sender, msg)

        node.on_app_message = on_app

        async def run(
            peer: Peer = peer,
            ep: Any = ep,
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with peer.scope:
                async with trio.open_nursery() as inner:
                    await inner.start(ep.run)
                    await inner.start(peer.node.run)
                    await inner.start(peer.desk.run)
                    task_status.started()

        await nursery.start(run)
        peers.append(peer)
    for peer in peers[1:]:
        await peer.node.add_peer(peers[0].node.endpoint.listen_addrs()[0])
    await settled(peers)
    return peers


async def settled(peers: list[Peer]) -> Peer:
    """The one leader every peer recognises, once they do."""
    with trio.fail_after(30):
        while True:
            leaders = {p.node.current_leader() for p in peers}
            ids = {p.node.peer_id: p for p in peers}
            if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                return ids[leader]
            await trio.sleep(0.05)


def ask(rid: str = "r1", model: str = "m") -> appmsg.ServeAsk:
    return appmsg.ServeAsk(rid, model, "even", "latency", "none")


async def test_a_follower_asks_and_the_leader_answers(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        leader = await settled(peers)
        asker = next(p for p in peers if p is not leader)
        leader.release.set()
        assert await asker.desk.ask(ask(), 30) == leader.epoch
        assert [a.rid for a in leader.asked] == ["r1"]
        nursery.cancel_scope.cancel()


async def test_the_leaders_reason_reaches_the_asker(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        leader = await settled(peers)
        asker = next(p for p in peers if p is not leader)
        leader.error = "cannot serve m on these 2 peers: short by 300 MiB"
        leader.release.set()
        with pytest.raises(ServeFailed, match="short by 300 MiB"):
            await asker.desk.ask(ask(), 30)
        nursery.cancel_scope.cancel()


async def test_the_leader_changes_while_a_request_waits(autojump_clock: Any) -> None:
    """The leader takes the request and dies before answering; the new leader, whose live plan
    already satisfies the request, answers at once when the asker sends it again."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 4)
        old = await settled(peers)
        asker = next(p for p in peers if p is not old)
        for p in peers:
            p.live = a_plan(7)  # the plan every peer serves already
        result: list[int] = []

        async def run_ask() -> None:
            result.append(await asker.desk.ask(ask(), 120))

        nursery.start_soon(run_ask)
        with trio.fail_after(10):
            while not old.asked:
                await trio.sleep(0.01)
        old.scope.cancel()  # gone, its plan never made
        rest = [p for p in peers if p is not old]
        new = await settled(rest)
        elected_at = trio.current_time()
        with trio.fail_after(60):
            while not result:
                await trio.sleep(0.01)
        assert result == [7]
        assert not new.asked  # answered from the live plan: no planning again
        # "At once": within a heartbeat or two of the new leader being recognised.
        assert trio.current_time() - elected_at < 2 * CFG.heartbeat_interval_s + 0.1
        nursery.cancel_scope.cancel()


async def test_a_request_sent_twice_is_planned_once(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        leader = await settled(peers)
        asker = next(p for p in peers if p is not leader)
        body = ask().to_obj()
        for _ in range(3):
            await asker.node.send_app(leader.node.peer_id, body)
        leader.release.set()
        assert await asker.desk.ask(ask(), 30) == leader.epoch  # the same id, answered again
        assert len(leader.asked) == 1
        nursery.cancel_scope.cancel()


async def test_the_leader_asks_itself(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        leader = await settled(peers)
        assert leader.node.role == LEADER
        leader.release.set()
        assert await leader.desk.ask(ask(), 30) == leader.epoch
        nursery.cancel_scope.cancel()


async def test_no_leader_at_all_times_out_with_a_reason(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        leader = await settled(peers)
        with pytest.raises(ServeTimeout, match="no plan"):
            await leader.desk.ask(ask(), 5)  # its make_plan never returns
        nursery.cancel_scope.cancel()


def test_satisfies() -> None:
    assert satisfies(a_plan(1), ask())
    assert not satisfies(a_plan(1, model="other"), ask())
    assert not satisfies(a_plan(1, partitioner="lp"), ask())
    assert not satisfies(None, ask())
