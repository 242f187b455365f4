"""A query that gets no token fails with the stage that holds it up, and why."""

from __future__ import annotations

import pytest
import trio

from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.coordinator import Coordinator, QueryFailed
from meshllm.pipeline.frames import Frame
from meshllm.pipeline.stall import STUCK_AFTER_S, StageView, why_stalled
from tests.unit.test_coordinator import ARCH, plan

READY = {"epoch": 1, "state": "ready"}
CALM = {"epoch": 1, "queued": 0, "busy": 0, "idle_s": 60.0}


def views(**by_peer: StageView):  # type: ignore[no-untyped-def]
    fine = {p: StageView(f"phone-{p}", True, READY, CALM) for p in ("a", "b")}
    fine.update(by_peer)
    return fine.__getitem__


@pytest.mark.parametrize(
    ("b", "expected"),
    [
        (
            StageView("phone-b", False, READY, CALM),
            "stage 1 (phone-b, layers 2-4) is not heard from",
        ),
        (StageView("phone-b", True, {}, None, "bad role 'king'"), "cannot read: bad role 'king'"),
        (
            StageView("phone-b", True, {"epoch": 0, "state": "idle"}, None),
            "is on plan 0, not plan 1",
        ),
        (
            StageView(
                "phone-b",
                True,
                {"epoch": 1, "state": "loading", "progress": 0.42, "detail": "segment 2-4"},
                None,
            ),
            "is loading its segment: segment 2-4 (42%)",
        ),
        (
            StageView(
                "phone-b",
                True,
                READY,
                {"epoch": 1, "queued": 3, "busy": 0, "idle_s": STUCK_AFTER_S + 7},
            ),
            "has not started a step for 12 s, with 3 frame(s) waiting",
        ),
        (
            StageView("phone-b", True, READY, {"epoch": 1, "queued": 0, "busy": 1, "idle_s": 40.0}),
            "stage 1 (phone-b, layers 2-4) is running a step for 40 s",
        ),
        # Frames waiting on an older plan's runner, or a short wait: not this stage.
        (
            StageView("phone-b", True, READY, {"epoch": 0, "queued": 3, "busy": 1, "idle_s": 40.0}),
            "a frame was lost between stages",
        ),
        (
            StageView("phone-b", True, READY, {"epoch": 1, "queued": 3, "busy": 0, "idle_s": 1.0}),
            "a frame was lost between stages",
        ),
    ],
)
def test_the_first_stage_that_cannot_answer_is_named(b, expected):
    assert expected in why_stalled(plan(1), views(b=b))


def test_the_first_stage_in_pipeline_order_is_named():
    down = {
        "a": StageView("phone-a", True, {"epoch": 0, "state": "idle"}, None),
        "b": StageView("phone-b", False, READY, CALM),
    }
    assert why_stalled(plan(1), down.__getitem__).startswith("stage 0 (phone-a")


async def test_a_query_with_no_token_fails_with_the_stage_reason(autojump_clock):
    async def swallow(_peer: str, _f: Frame) -> None:
        """A pipeline that takes every frame and answers none."""

    loading = StageView("phone-b", True, {"epoch": 1, "state": "loading", "progress": 0.5}, None)
    coord = Coordinator(
        "c", swallow, step_timeout_s=30, why_stalled=lambda p: why_stalled(p, views(b=loading))
    )
    with pytest.raises(QueryFailed) as err:
        await coord.run_query(plan(1), ARCH, [5, 6, 7], max_tokens=4, sampling=SamplingParams())
    msg = str(err.value)
    assert msg.startswith("no token from the mesh within 30 s: stage 1 (phone-b")
    assert "is loading its segment (50%)" in msg
    assert trio.current_time() >= 30
