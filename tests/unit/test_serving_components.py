"""The serving components alone, each against small fakes of its neighbours (trio's autojump
clock, no daemon, no model): what the shared serving state says is ready, the balancer's
decisions, the query gateway's limits and reasons, plan adoption by the segment loader, and
the leader replacing a plan that lost a peer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from meshllm.balance import Decision
from meshllm.config import BalanceSection, Config, LimitsSection
from meshllm.errors import MeshError, Refused
from meshllm.mesh.node import FOLLOWER, LEADER
from meshllm.model.manifest import Architecture
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline import balancing
from meshllm.pipeline.balancing import Balancer
from meshllm.pipeline.gateway import QueryGateway
from meshllm.pipeline.leader import Leader
from meshllm.pipeline.loader import SegmentLoader
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.plan import Plan, Stage
from meshllm.pipeline.serving_state import ServingState

ME = "peer-a"
ARCH = Architecture(
    model_type="llama",
    num_layers=30,
    hidden_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_size=4,
    vocab_size=100,
    context_length=64,
    bos_token_id=1,
    eos_token_ids=(2,),
    kv_dtype="float32",
)


def plan(epoch: int, *stages: tuple[str, int, int], balance: str = "threshold") -> Plan:
    return Plan(
        epoch=epoch,
        model="m",
        model_sha="ab" * 32,
        source=ME,
        num_layers=30,
        partitioner="even",
        stages=tuple(Stage(*s) for s in stages),
        predicted={"objective": "latency", "step_s": 0.05},
        balance=balance,
    )


PLAN = plan(1, ("peer-b", 0, 10), ("peer-c", 10, 20), ("peer-d", 20, 30))


def ready(epoch: int, recent_s: float = 0.01, **more: Any) -> PeerState:
    stats = {"epoch": epoch, "steps": 50, "baseline_s": 0.01, "recent_s": recent_s}
    return PeerState(serving={"epoch": epoch, "state": "ready"}, stage_stats=stats, **more)


class FakeNode:
    """The mesh node as the serving components see it: who is alive and what each publishes."""

    def __init__(self, states: dict[str, PeerState], role: str = LEADER):
        self.peer_id = ME
        self.name = "a"
        self.role = role
        self.peers: dict[str, Any] = dict.fromkeys(states)  # records are not read here
        self.states = states
        self.announced = 0

    def announce(self) -> None:
        self.announced += 1

    def state_of(self, pid: str | None) -> PeerState | None:
        return self.states.get(pid or "")

    def peer_alive(self, pid: str) -> bool:
        return pid in self.states

    def alive_peers(self) -> list[str]:
        return sorted(self.states)

    def current_leader(self) -> str:
        return ME


class FakeStore:
    def list(self) -> list[Any]:
        return []

    def by_sha(self, sha: str) -> None:
        return None


def serving_state(states: dict[str, PeerState], **node: Any) -> ServingState:
    state = ServingState(FakeNode(states, **node), FakeStore())  # type: ignore[arg-type]
    state.manifest = object()  # type: ignore[assignment]  # only its presence is read here
    return state


# -- the shared serving state -------------------------------------------------------------------
async def test_a_plan_is_ready_only_when_every_stage_says_so_for_it() -> None:
    states = {"peer-b": ready(1), "peer-c": ready(0), "peer-d": ready(1)}
    state = serving_state(states)
    changed = state.plan_changed()
    state.adopt(PLAN)
    assert changed.is_set() and not state.plan_changed().is_set()
    assert not state.plan_ready()  # peer-c is still on plan 0
    states["peer-c"] = ready(1)
    assert state.plan_ready()
    del states["peer-d"]  # not heard from any more
    assert not state.plan_ready()
    state.adopt(plan(2, ("peer-b", 0, 30)))
    assert state.replaced == PLAN and state.epoch == 2


# -- the balancer -------------------------------------------------------------------------------
class FakeLeader:
    def __init__(self, state: ServingState, gain: float):
        self.state = state
        self.speed_factors: dict[str, float] = {}
        self.gain = gain
        self.built: list[dict[str, float]] = []

    async def build_plan(
        self, model: str, partitioner: str, objective: Any, balance: Any, factors: dict[str, float]
    ) -> tuple[Plan, tuple]:
        self.built.append(factors)
        step = 0.05 / self.gain
        candidate = replace(
            plan(
                self.max_epoch_seen() + 1, ("peer-b", 0, 15), ("peer-c", 15, 17), ("peer-d", 17, 30)
            ),
            predicted={"step_s": step},
        )
        return candidate, ([], {"peer-b": object()})

    def max_epoch_seen(self) -> int:
        return self.state.epoch


class FakeLoader:
    """Prepares a staged plan by having every peer in it publish that it did."""

    def __init__(self, state: ServingState, node: FakeNode, *, loads: bool = True):
        self.state, self.node, self.loads = state, node, loads
        self.prepared_epoch = 0
        self.staged: list[int] = []

    def prepare(self, staged: Plan) -> None:
        self.staged.append(staged.epoch)
        if self.loads:
            for pid in self.node.states:
                self.node.states[pid] = replace(self.node.states[pid], prepared=staged.epoch)


class ScriptedPolicy:
    """Says "peer-c is slow" on the looks its script marks, and nothing on the others."""

    def __init__(self, script: str):
        self.script = script
        self.looks = 0

    def decide(self, observation: Any) -> Decision | None:
        self.looks += 1
        slow = self.script[(self.looks - 1) % len(self.script)] == "x"
        return Decision({"peer-c": 3.0}, "peer-c is slow") if slow else None


class Policies:
    def __init__(self, policy: Any):
        self.policy = policy

    def get(self, name: str) -> Any:
        return self.policy


def balancer(policy: Any, *, gain: float = 2.0, loads: bool = True) -> tuple[Balancer, Any, Any]:
    states = {"peer-b": ready(1), "peer-c": ready(1, recent_s=0.03), "peer-d": ready(1)}
    state = serving_state(states)
    state.adopt(PLAN)
    config = replace(Config(), balance=BalanceSection(cooldown_s=1000.0))
    leader = FakeLeader(state, gain)
    loader = FakeLoader(state, state.node, loads=loads)  # type: ignore[arg-type]
    b = Balancer(config, state.node, state, leader, loader, Policies(policy))  # type: ignore[arg-type]
    return b, leader, loader


@pytest.fixture
def costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The current plan's predicted cost, as the leader's profiles would price it."""
    monkeypatch.setattr(balancing, "predict", lambda *ctx: {"step_s": 0.05, "bottleneck_s": 0.05})


async def run_until(b: Balancer, done: Any, timeout: float = 300) -> None:
    """Run the balancer until *done()* holds (or *timeout* passes, for a check that nothing
    happened)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        with trio.move_on_after(timeout):
            while not done():
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_verdict_repeated_three_looks_running_moves_layers(
    autojump_clock: Any, costs: None
) -> None:
    policy = ScriptedPolicy("x")
    b, leader, loader = balancer(policy)
    await run_until(b, lambda: b.state.epoch != 1)
    assert policy.looks == 3  # not before the third look in a row
    assert leader.built == [{"peer-c": 3.0}] and loader.staged == [2]
    assert b.state.plan is not None and b.state.plan.epoch == 2
    decision = b.status["last_decision"]
    assert decision["outcome"] == "replanned" and decision["gain"] == 2.0
    assert leader.speed_factors == {"peer-c": 3.0}  # later plans keep accounting for it
    assert b.staged is None


async def test_a_verdict_that_comes_and_goes_moves_nothing(
    autojump_clock: Any, costs: None
) -> None:
    policy = ScriptedPolicy("xx-")
    b, leader, _ = balancer(policy)
    await run_until(b, lambda: policy.looks >= 60)
    assert policy.looks >= 60
    assert leader.built == [] and b.state.epoch == 1 and "last_decision" not in b.status


async def test_a_small_predicted_gain_keeps_the_plan(autojump_clock: Any, costs: None) -> None:
    b, leader, loader = balancer(ScriptedPolicy("x"), gain=1.05)
    await run_until(b, lambda: "last_decision" in b.status)
    assert b.status["last_decision"]["outcome"] == "kept"
    assert b.state.epoch == 1 and loader.staged == [] and leader.speed_factors == {}


async def test_staging_that_never_finishes_switches_after_its_wait(
    autojump_clock: Any, costs: None
) -> None:
    """Staging only saves the switch its loading; peers that did not finish it load their
    part as for any new plan."""
    b, _, loader = balancer(ScriptedPolicy("x"), loads=False)
    await run_until(b, lambda: "last_decision" in b.status)
    decision = b.status["last_decision"]
    assert loader.staged == [2] and b.state.epoch == 2 and b.staged is None
    assert decision["outcome"] == "replanned"
    assert decision["staged_s"] == pytest.approx(balancing.STAGING_TIMEOUT_S, abs=1)


async def test_a_plan_changed_while_staging_drops_the_staged_one(
    autojump_clock: Any, costs: None
) -> None:
    b, leader, loader = balancer(ScriptedPolicy("x"), loads=False)
    other = plan(7, ("peer-b", 0, 30))
    loader.prepare = lambda staged: b.state.adopt(other)  # a peer was lost meanwhile
    await run_until(b, lambda: "last_decision" in b.status)
    assert b.status["last_decision"]["outcome"] == "dropped"
    assert b.state.plan == other and leader.speed_factors == {} and b.staged is None


async def test_only_the_leader_balances(autojump_clock: Any, costs: None) -> None:
    policy = ScriptedPolicy("x")
    b, leader, _ = balancer(policy)
    b.node.role = FOLLOWER
    await run_until(b, lambda: False, timeout=30)
    assert policy.looks == 0 and leader.built == []


# -- the query gateway --------------------------------------------------------------------------
class FakeReplan:
    def __init__(self) -> None:
        self.why: str | None = None

    def replan_failure(self, epoch: int) -> str | None:
        return self.why

    def imported(self) -> dict[str, Any]:
        return {"m": ({}, [ME])}


async def _no_send(peer: str, f: Any) -> None:
    raise AssertionError("nothing is sent for a query refused at the gateway")


def gateway(states: dict[str, PeerState], **limits: Any) -> tuple[QueryGateway, FakeReplan]:
    state = serving_state(states)
    state.tokenizer = object()  # type: ignore[assignment]
    config = replace(Config(), limits=LimitsSection(**limits))
    leader = FakeReplan()
    return QueryGateway(config, state.node, state, leader, _no_send), leader  # type: ignore[arg-type]


async def ask(gw: QueryGateway, prompt_ids: list[int], max_tokens: Any = 8) -> str:
    with pytest.raises(Refused) as info:
        await gw.generate(prompt_ids, max_tokens=max_tokens, sampling=SamplingParams())
    return f"{info.value.code}: {info.value}"


async def test_the_gateway_says_why_it_cannot_answer(autojump_clock: Any) -> None:
    states = {
        "peer-b": ready(1),
        "peer-c": PeerState(serving={"epoch": 1, "state": "fetching", "progress": 0.25}),
        "peer-d": ready(1),
    }
    gw, leader = gateway(states, max_prompt_tokens=16, max_new_tokens=32)
    assert (await ask(gw, [1])).startswith("not_serving: no model is served")
    gw.state.adopt(PLAN)
    assert gw.served_model() == "m" and gw.model_names() == ["m"]
    why = await ask(gw, [1])
    assert why.startswith("not_ready") and "stage 1" in why and "fetching its segment (25%)" in why
    leader.why = "not enough memory on the 2 peers left"
    assert "not_serving" in (why := await ask(gw, [1])) and "not enough memory" in why
    leader.why = None
    states["peer-c"] = ready(1)
    assert "too_large" in (why := await ask(gw, [1] * 17)) and "max_prompt_tokens" in why
    assert "too_large" in (why := await ask(gw, [1], 33)) and "max_new_tokens" in why
    assert (await ask(gw, [1], True)).startswith("bad_request")
    assert (await ask(gw, [1], 0)).startswith("bad_request")


async def test_a_busy_gateway_sends_the_client_elsewhere(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _ = gateway(
        {"peer-b": ready(1), "peer-c": ready(1), "peer-d": ready(1)}, max_concurrent_requests=2
    )
    gw.state.adopt(PLAN)
    monkeypatch.setattr(type(gw.coordinator), "in_flight", property(lambda self: 2))
    why = await ask(gw, [1])
    assert why.startswith("busy") and "ask another peer" in why


async def test_a_query_waits_for_a_plan_that_is_loading(autojump_clock: Any) -> None:
    states = {
        "peer-b": ready(1),
        "peer-c": PeerState(serving={"epoch": 1, "state": "loading"}),
        "peer-d": ready(1),
    }
    gw, _ = gateway(states)
    gw.state.adopt(PLAN)
    got: list[Any] = []

    async def asker() -> None:
        got.append(await gw.ready_model_soon())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.sleep(5)
        assert got == []
        t0 = trio.current_time()
        states["peer-c"] = ready(1)
        gw.state.poke()  # as a heartbeat does
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        assert trio.current_time() - t0 < 0.1  # woken by the news, not by a poll
    assert got[0].name == "m"
    states["peer-c"] = PeerState(serving={"epoch": 1, "state": "loading"})
    t0 = trio.current_time()
    with pytest.raises(Refused, match="still loading"):
        await gw.ready_model_soon()
    assert trio.current_time() - t0 == pytest.approx(QueryGateway.READY_WAIT_S, abs=1)


# -- the segment loader -------------------------------------------------------------------------
class CountingLoader(SegmentLoader):
    """The loader's plan tracking, with the loading itself replaced by a record of it."""

    def __init__(self, state: ServingState):
        super().__init__(Path("."), Config(), _Ep(), state.node, state, None, None)  # type: ignore[arg-type]
        self.loaded: list[int] = []
        self.cancelled: list[int] = []

    async def _realize_inner(self, plan: Plan) -> None:
        try:
            await trio.sleep(10 if plan.epoch == 2 else 0)
        except trio.Cancelled:
            self.cancelled.append(plan.epoch)
            raise
        self.loaded.append(plan.epoch)


class _Ep:
    peer_id = ME


async def test_the_loader_follows_each_plan_and_drops_one_replaced_while_loading(
    autojump_clock: Any,
) -> None:
    state = serving_state({})
    loader = CountingLoader(state)
    async with trio.open_nursery() as nursery:
        await nursery.start(loader.run)
        state.adopt(plan(1, (ME, 0, 30)))
        await trio.sleep(1)
        state.adopt(plan(2, (ME, 0, 30)))  # takes 10 s to load...
        await trio.sleep(1)
        state.adopt(plan(3, (ME, 0, 30)))  # ...and is replaced before that
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert loader.loaded == [1, 3] and loader.cancelled == [2]


async def test_a_stopping_gateway_refuses_new_queries_and_drains(autojump_clock: Any) -> None:
    sent: list[Any] = []

    async def park(peer: str, f: Any) -> None:  # the first stage takes it, and never answers
        sent.append(f)

    gw, _ = gateway({"peer-b": ready(1), "peer-c": ready(1), "peer-d": ready(1)})
    gw.coordinator.send = park
    gw.state.manifest = SimpleNamespace(architecture=ARCH)  # type: ignore[assignment]
    gw.state.adopt(PLAN)
    drained: list[float] = []
    async with trio.open_nursery() as nursery:
        query = trio.CancelScope()

        async def one_query() -> None:
            with query:
                await gw.generate([5, 6, 7], max_tokens=4, sampling=SamplingParams())

        async def drain() -> None:
            await gw.drained()
            drained.append(trio.current_time())

        nursery.start_soon(one_query)
        with trio.fail_after(5):
            while not sent:
                await trio.sleep(0.01)
        gw.stopping = True
        nursery.start_soon(drain)
        await trio.sleep(5)
        assert drained == [] and gw.coordinator.in_flight == 1
        why = await ask(gw, [1])
        assert why.startswith("not_serving") and "stopping" in why
        t0 = trio.current_time()
        query.cancel()
    assert drained and drained[0] - t0 < 0.1


# -- the leader's reading of the mesh -----------------------------------------------------------
def leader_over(states: dict[str, PeerState], mine: Plan | None = None) -> Leader:
    state = serving_state(states)
    if mine is not None:
        state.adopt(mine)
    return Leader(Config(), state.node, state, None, None)  # type: ignore[arg-type]


def test_a_plan_is_taken_from_the_mesh_only_when_most_peers_serve_it() -> None:
    newer, other = plan(5, ("peer-b", 0, 30)), plan(6, ("peer-c", 0, 30))
    # A leader that restarted: most of the mesh serves a newer plan than its own.
    taken = leader_over(
        {
            "peer-b": PeerState(plan=newer),
            "peer-c": PeerState(plan=newer),
            "peer-d": PeerState(plan=other),
        },
        mine=PLAN,
    )
    assert taken.majority_plan() == newer
    # One peer alone (a stale or buggy one) cannot impose a plan, however new.
    alone = leader_over(
        {"peer-b": PeerState(plan=other), "peer-c": PeerState(), "peer-d": PeerState()}, mine=PLAN
    )
    assert alone.majority_plan() is None
    # Nothing older than the leader's own plan is taken back.
    assert leader_over({"peer-b": PeerState(plan=PLAN)}, mine=newer).majority_plan() is None


def test_a_new_epoch_follows_every_credible_one_seen() -> None:
    far = plan(2**62 - 1, ("peer-b", 0, 30))
    seen = leader_over(
        {"peer-b": PeerState(plan=plan(9, ("peer-b", 0, 30))), "peer-c": PeerState(plan=far)},
        mine=PLAN,
    )
    # Epoch 9 counts; one far beyond this peer's own (it would leave no epoch that
    # decodes) does not.
    assert seen.max_epoch_seen() == 9


def test_the_planner_gives_no_layers_to_a_peer_that_runs_no_stages() -> None:
    from meshllm.config import PeerSection

    states = {"peer-b": PeerState(stages=False), "peer-c": PeerState(), "peer-d": PeerState()}
    leader = leader_over(states)
    assert leader.stage_peers() == sorted([leader.me, "peer-c", "peer-d"])
    # A heartbeat says so only when false; older peers, which do not say, run stages.
    assert PeerState.from_obj({"stages": False}).stages is False
    assert PeerState.from_obj({}).stages is True
    with pytest.raises(MeshError):
        PeerState.from_obj({"stages": "no"})
    # This peer itself, by its own config.
    files_only = Leader(
        Config(peer=PeerSection(stages=False)),
        leader.node,
        leader.state,
        None,
        None,  # type: ignore[arg-type]
    )
    assert files_only.stage_peers() == ["peer-c", "peer-d"]


# -- the leader replacing a plan that lost a peer -----------------------------------------------
class PlanMaker:
    """Stands in for Leader.make_plan: records each call; fails while *error* is set."""

    def __init__(self, leader: Leader):
        self.leader = leader
        self.calls: list[tuple[Any, ...]] = []
        self.error: str | None = None

    async def __call__(self, *args: Any) -> Plan:
        self.calls.append((trio.current_time(), *args))
        if self.error is not None:
            raise MeshError(self.error)
        new = plan(self.leader.state.epoch + 1, ("peer-b", 0, 15), ("peer-c", 15, 30))
        self.leader.state.adopt(new)
        return new


def watching(states: dict[str, PeerState], role: str = LEADER) -> tuple[Leader, PlanMaker]:
    state = ServingState(FakeNode(states, role=role), FakeStore())  # type: ignore[arg-type]
    state.adopt(PLAN)
    leader = Leader(Config(), state.node, state, None, None)  # type: ignore[arg-type]
    maker = PlanMaker(leader)
    leader.make_plan = maker  # type: ignore[method-assign]
    return leader, maker


async def test_a_plan_that_lost_a_stage_is_replaced_like_for_like(autojump_clock: Any) -> None:
    states = {p: PeerState() for p in ("peer-b", "peer-c", "peer-d")}
    leader, maker = watching(states)
    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run)
        await trio.sleep(5)
        assert maker.calls == []  # every stage's peer is alive: nothing to do
        del states["peer-d"]
        await trio.sleep(1)
        # The same model, partitioner, objective and balance policy, on the peers left.
        assert [c[1:] for c in maker.calls] == [("m", "even", "latency", "threshold")]
        assert leader.state.epoch == 2 and leader.replan_error is None
        await trio.sleep(10)
        assert len(maker.calls) == 1  # the new plan lost nobody
        nursery.cancel_scope.cancel()


async def test_a_plan_that_cannot_be_replaced_says_why_and_is_retried(autojump_clock: Any) -> None:
    states = {p: PeerState() for p in ("peer-b", "peer-c")}  # peer-d is gone from the start
    leader, maker = watching(states)
    maker.error = "no live peer has imported a model named 'm'"
    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run)
        await trio.sleep(7)
        # Said on heartbeats (queries then fail with the reason), and retried every couple
        # of seconds, not in a tight loop.
        assert leader.replan_failure(PLAN.epoch) == maker.error
        assert leader.replan_failure(PLAN.epoch + 1) is None
        gaps = [b[0] - a[0] for a, b in zip(maker.calls, maker.calls[1:], strict=False)]
        assert len(maker.calls) >= 3 and min(gaps) >= 2.0
        assert leader.node.announced >= len(maker.calls)
        # Once the peers are back (or the source returns), the next try works.
        maker.error = None
        await trio.sleep(3)
        assert leader.state.epoch == 2 and leader.replan_failure(PLAN.epoch) is None
        nursery.cancel_scope.cancel()


async def test_only_the_leader_replaces_a_plan(autojump_clock: Any) -> None:
    leader, maker = watching({"peer-b": PeerState()}, role=FOLLOWER)
    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert maker.calls == [] and leader.state.epoch == PLAN.epoch
