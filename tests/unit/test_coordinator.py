"""The coordinator's replay and queueing protocol, against a scripted fake pipeline."""

from __future__ import annotations

import pytest
import trio

from meshllm.model.manifest import Architecture
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.coordinator import Coordinator, QueryFailed
from meshllm.pipeline.frames import END, ERROR, FWD, TOKEN, Frame
from meshllm.pipeline.plan import Plan, Stage

ARCH = Architecture(
    model_type="llama",
    num_layers=4,
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
ANSWER = [11, 12, 13, 14, 15, 16]


def plan(epoch: int) -> Plan:
    return Plan(
        epoch=epoch,
        model="m",
        model_sha="s",
        source="a",
        num_layers=4,
        partitioner="even",
        stages=(Stage("a", 0, 2), Stage("b", 2, 4)),
    )


class FakeMesh:
    """Plays the pipeline: answers each request's first frame with its tokens (forced ones
    echoed first), after an optional script of failures per attempt."""

    def __init__(self, script: list[str]):
        self.script = script  # per attempt: "ok", "busy", or "lose-after-3"
        self.firsts: list[Frame] = []
        self.ends = 0
        self.coordinator: Coordinator | None = None

    async def send(self, peer: str, f: Frame) -> None:
        if f.kind == END:
            self.ends += 1
            return
        assert f.kind == FWD and f.step == 0
        self.firsts.append(f)
        what = self.script[len(self.firsts) - 1]
        deliver = self.coordinator.deliver  # type: ignore[union-attr]
        if what == "busy":
            deliver(Frame(kind=ERROR, rid=f.rid, epoch=f.epoch, error="stage 1: full", busy=True))
            return
        tokens = ANSWER[:3] if what == "lose-after-3" else ANSWER
        for step, tok in enumerate(tokens):
            deliver(Frame(kind=TOKEN, rid=f.rid, epoch=f.epoch, step=step, token=tok))
        if what == "lose-after-3":
            deliver(
                Frame(
                    kind=ERROR,
                    rid=f.rid,
                    epoch=f.epoch,
                    step=3,
                    error="stage 0: activation link to b failed",
                    retry=True,
                )
            )


async def run(mesh: FakeMesh, next_plan=None) -> dict:
    coord = Coordinator("c", mesh.send, step_timeout_s=5, next_plan=next_plan)
    mesh.coordinator = coord
    seen: list[int] = []

    async def on_token(t: int) -> None:
        seen.append(t)

    with trio.fail_after(10):
        result = await coord.run_query(
            plan(1),
            ARCH,
            [5, 6, 7],
            max_tokens=len(ANSWER),
            sampling=SamplingParams(),
            on_token=on_token,
        )
    assert seen == result.token_ids  # the client's stream: every token once, in order
    return result.to_dict()


async def test_a_request_interrupted_mid_way_is_replayed_on_the_next_plan():
    mesh = FakeMesh(["lose-after-3", "ok"])

    async def next_plan(after: int, reason: str) -> Plan:
        assert after == 1 and "link" in reason
        return plan(2)

    result = await run(mesh, next_plan)
    assert result["token_ids"] == ANSWER
    first, replay = mesh.firsts
    assert first.force == [] and first.epoch == 1
    # The replay: same prompt and capacity on the new plan, the tokens so far forced.
    assert replay.epoch == 2 and replay.force == ANSWER[:3]
    assert replay.tensors["input_ids"].tolist() == [[5, 6, 7]] and replay.cap == first.cap
    assert result["recoveries"][0]["tokens_done"] == 3 and result["plan_epoch"] == 2


async def test_without_a_next_plan_the_interruption_is_a_clear_failure():
    with pytest.raises(QueryFailed, match="activation link"):
        await run(FakeMesh(["lose-after-3"]))


async def test_a_full_stage_queues_the_request_instead_of_failing_it():
    mesh = FakeMesh(["busy", "busy", "ok"])
    result = await run(mesh)
    assert result["token_ids"] == ANSWER and result["queued_s"] > 0
    assert len(mesh.firsts) == 3 and mesh.ends >= 2  # what was started is freed each time
    assert all(f.force == [] for f in mesh.firsts)


async def test_a_broken_link_on_a_plan_that_stays_current_is_retried_on_it():
    mesh = FakeMesh(["lose-after-3", "ok"])
    stale: list[Frame] = []

    async def next_plan(after: int, reason: str) -> Plan:
        # The broken attempt's stages may still send a late token on the same epoch.
        first = mesh.firsts[0]
        stale.append(Frame(kind=TOKEN, rid=first.rid, epoch=1, step=3, token=99))
        mesh.coordinator.deliver(stale[0])  # type: ignore[union-attr]
        return plan(1)

    result = await run(mesh, next_plan)
    assert result["token_ids"] == ANSWER and result["plan_epoch"] == 1
    first, retry = mesh.firsts
    assert retry.epoch == 1 and retry.force == ANSWER[:3]
    # The retry runs under a new id, and the old one was ended on the stages.
    assert retry.rid != first.rid and mesh.ends >= 1


class MovingMesh(FakeMesh):
    """The new plan's first frame carries a KV source; "move-fails" answers it with the
    retry error a stage gives when it cannot fetch the cache."""

    async def send(self, peer: str, f: Frame) -> None:
        if f.kind == FWD and f.kv_from is not None:
            self.firsts.append(f)
            what = self.script[len(self.firsts) - 1]
            deliver = self.coordinator.deliver  # type: ignore[union-attr]
            if what == "move-fails":
                deliver(
                    Frame(
                        kind=ERROR,
                        rid=f.rid,
                        epoch=f.epoch,
                        retry=True,
                        error="stage 1: cannot move the KV cache: gone",
                    )
                )
                return
            for step, tok in enumerate(ANSWER[3:]):
                deliver(Frame(kind=TOKEN, rid=f.rid, epoch=f.epoch, step=step, token=tok))
            return
        await super().send(peer, f)


async def run_moving(mesh: FakeMesh, alive: bool = True) -> dict:
    async def next_plan(after: int, reason: str) -> Plan:
        return plan(after + 1)

    coord = Coordinator(
        "c", mesh.send, step_timeout_s=5, peer_alive=lambda p: alive, next_plan=next_plan
    )
    mesh.coordinator = coord
    with trio.fail_after(10):
        result = await coord.run_query(
            plan(1), ARCH, [5, 6, 7], max_tokens=len(ANSWER), sampling=SamplingParams()
        )
    return result.to_dict()


async def test_on_a_new_plan_the_kv_cache_is_moved_instead_of_replayed():
    mesh = MovingMesh(["lose-after-3", "ok"])
    result = await run_moving(mesh)
    assert result["token_ids"] == ANSWER
    _, resumed = mesh.firsts
    src = resumed.kv_from
    # The last token is the next input; the cache up to its position comes from plan 1.
    assert src is not None and src.epoch == 1 and resumed.epoch == 2
    assert src.stages == (("a", 0, 2), ("b", 2, 4)) and src.length == 3 + 3 - 1
    assert src.drawn == 3 and resumed.pos == src.length + 1 and resumed.new == 1
    assert resumed.tensors["input_ids"].tolist() == [[ANSWER[2]]] and resumed.force == []
    assert result["recoveries"][0]["moved_kv"] is True


async def test_a_failed_move_falls_back_to_replaying_on_the_same_plan():
    mesh = MovingMesh(["lose-after-3", "move-fails", "ok"])
    result = await run_moving(mesh)
    assert result["token_ids"] == ANSWER
    _, moved, replay = mesh.firsts
    assert moved.kv_from is not None and replay.kv_from is None
    assert replay.epoch == moved.epoch == 2 and replay.force == ANSWER[:3]
    assert replay.rid != moved.rid  # the failed attempt's id was ended
    assert result["recoveries"][0]["moved_kv"].startswith("failed: stage 1: cannot move")


async def test_with_an_old_peer_gone_the_request_is_replayed():
    mesh = MovingMesh(["lose-after-3", "ok"])
    result = await run_moving(mesh, alive=False)
    assert result["token_ids"] == ANSWER and mesh.firsts[1].kv_from is None
    assert mesh.firsts[1].force == ANSWER[:3] and result["recoveries"][0]["moved_kv"] is False
