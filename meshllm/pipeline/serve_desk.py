"""``serve`` as a request and a reply between the peer that was asked and the leader.

The asker sends ``ServeAsk`` (with a fresh request id) to the leader it recognises and waits
for ``ServeReply``: the epoch of the plan made for it, or why none could be. While it waits it
watches the leader: when another peer takes the lead, the request is sent again to it, marked
``resent``, and a new leader whose live plan already satisfies the request (same model,
partitioner, balancing policy, objective) answers with that plan at once instead of planning
again. A leader that gets the same request id twice answers both askers from one plan.

The asker never waits out its timeout silently on a request that nobody holds any more: each
change of leader re-sends it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog
import trio

from meshllm.errors import MeshError
from meshllm.mesh.contain import spawn
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.mesh.transport import PeerUnreachable
from meshllm.pipeline.appmsg import ServeAsk, ServeReply
from meshllm.pipeline.plan import Plan

log = structlog.get_logger("meshllm.serve")

MakePlan = Callable[[ServeAsk], Awaitable[int]]  # the epoch of the plan made (raises MeshError)
_REMEMBERED = 32  # requests a leader remembers the outcome of (a re-sent one is answered)
_RETRY_S = 0.5  # after a failed send to the leader
# A leader that holds the request answers a repeat from what it remembers, so repeating it
# now and then costs nothing and survives a reply lost on the way.
RESEND_S = 5.0


class ServeFailed(MeshError):
    """The leader could not make a plan for a serve request (the reason is its message)."""


class ServeTimeout(MeshError):
    """No plan was made for a serve request in the time allowed."""


@dataclass
class _Asked:
    """A request this leader holds: who waits for its answer, and the answer once known."""

    waiters: set[str] = field(default_factory=set)
    reply: ServeReply | None = None


@dataclass
class _Pending:
    """A request this peer sent: its answer, once it comes."""

    done: trio.Event = field(default_factory=trio.Event)
    reply: ServeReply | None = None


def satisfies(plan: Plan | None, ask: ServeAsk) -> bool:
    """Whether *plan* is what *ask* asks for."""
    if plan is None or plan.model != ask.model:
        return False
    objective = (plan.predicted or {}).get("objective")
    return (
        (ask.partitioner is None or plan.partitioner == ask.partitioner)
        and (ask.balance is None or plan.balance == ask.balance)
        and (ask.objective is None or objective in (None, ask.objective))
    )


class ServeDesk:
    """Both ends of serve requests for one peer. *make_plan* makes and publishes a plan (this
    peer being the leader); *live_plan* is the plan this peer serves now."""

    def __init__(self, node: MeshNode, make_plan: MakePlan, live_plan: Callable[[], Plan | None]):
        self.node = node
        self.me = node.peer_id
        self.make_plan = make_plan
        self.live_plan = live_plan
        self._asked: OrderedDict[str, _Asked] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- the asker --------------------------------------------------------------------------
    async def ask(self, ask: ServeAsk, timeout: float) -> int:
        """The epoch of the plan the leader made (or kept) for *ask*. Raises ServeFailed
        with the leader's reason, or ServeTimeout."""
        pending = self._pending[ask.rid] = _Pending()
        sent_to: str | None = None
        resent = False
        resend_at = 0.0
        try:
            with trio.move_on_after(timeout):
                while pending.reply is None:
                    changed = self.node.leader_changed
                    leader = self.node.current_leader()
                    now = trio.current_time()
                    if leader is not None and (leader != sent_to or now >= resend_at):
                        resent = resent or (sent_to is not None and leader != sent_to)
                        if leader != sent_to and sent_to is not None:
                            log.info("serve_request_resent", rid=ask.rid, to=leader)
                        if await self._send(leader, replace(ask, resent=resent)):
                            sent_to, resend_at = leader, now + RESEND_S
                        else:
                            resend_at = now + _RETRY_S
                    with trio.move_on_after(max(resend_at - trio.current_time(), 0.0)):
                        await _first_of(pending.done, changed)
        finally:
            del self._pending[ask.rid]
        reply = pending.reply
        if reply is None:
            raise ServeTimeout(f"the leader made no plan for {ask.model!r} within {timeout:g} s")
        if reply.epoch is None:
            raise ServeFailed(reply.error or "no plan")
        return reply.epoch

    async def _send(self, leader: str, ask: ServeAsk) -> bool:
        if leader == self.me:
            self.on_ask(self.me, ask)
            return True
        try:
            await self.node.send_app(leader, ask.to_obj())
            return True
        except PeerUnreachable:
            return False

    def on_reply(self, sender: str, reply: ServeReply) -> None:
        pending = self._pending.get(reply.rid)
        if pending is None or pending.reply is not None:
            return  # answered already, or never asked here: nothing to do
        pending.reply = reply
        pending.done.set()

    # -- the leader -------------------------------------------------------------------------
    def on_ask(self, sender: str, ask: ServeAsk) -> None:
        if self.node.role != LEADER or self._nursery is None:
            return  # the asker sends it again to whoever leads
        held = self._asked.get(ask.rid)
        if held is not None:
            if held.reply is not None:
                self._reply(sender, held.reply)
            else:
                held.waiters.add(sender)
            return
        held = self._asked[ask.rid] = _Asked({sender})
        while len(self._asked) > _REMEMBERED:
            self._asked.popitem(last=False)
        live = self.live_plan()
        if ask.resent and satisfies(live, ask):
            assert live is not None
            log.info("serve_request_answered", rid=ask.rid, epoch=live.epoch, plan="live")
            self._settle(held, ServeReply(ask.rid, epoch=live.epoch))
            return
        spawn(self._nursery, "serve_request", sender, self._plan, ask, held)

    async def _plan(self, ask: ServeAsk, held: _Asked) -> None:
        try:
            epoch = await self.make_plan(ask)
            reply = ServeReply(ask.rid, epoch=epoch)
        except MeshError as exc:
            log.warning("serve_request_failed", rid=ask.rid, reason=str(exc))
            reply = ServeReply(ask.rid, error=str(exc))
        self._settle(held, reply)

    def _settle(self, held: _Asked, reply: ServeReply) -> None:
        held.reply = reply
        for peer in held.waiters:
            self._reply(peer, reply)
        held.waiters.clear()

    def _reply(self, peer: str, reply: ServeReply) -> None:
        if peer == self.me:
            self.on_reply(self.me, reply)
        elif self._nursery is not None:
            self._nursery.start_soon(self._send_reply, peer, reply)

    async def _send_reply(self, peer: str, reply: ServeReply) -> None:
        try:
            await self.node.send_app(peer, reply.to_obj())
        except PeerUnreachable as exc:  # the asker re-sends if it still waits
            log.info("serve_reply_undelivered", other=peer, reason=str(exc))


async def _first_of(*events: trio.Event) -> None:
    """Return once any of *events* is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
