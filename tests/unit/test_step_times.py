"""A stage's decode-step times: warm-up ignored, a baseline, then a moving average."""

from __future__ import annotations

import pytest

from meshllm.pipeline.step_times import StepTimes


def test_a_baseline_after_warm_up_then_a_moving_average() -> None:
    t = StepTimes()
    for _ in range(StepTimes.WARMUP_STEPS):
        t.note(1.0)  # first-run allocations: not the stage's cost
    assert t.recent_s == 0 and t.baseline_s == 0
    for _ in range(StepTimes.BASELINE_STEPS):
        t.note(0.01)
    assert t.baseline_s == pytest.approx(0.01) and t.measured == 0
    for _ in range(30):  # the phone slows down to three times its cost
        t.note(0.03)
    assert t.measured == 30 and t.baseline_s == pytest.approx(0.01)
    assert t.recent_s == pytest.approx(0.03, rel=0.01)


def test_the_recent_rate_counts_the_last_ten_seconds() -> None:
    t = StepTimes()
    assert t.recent_rate(now=100.0) == 0.0
    for i in range(1, 41):  # 4 steps a second for 10 s
        t.note(0.01)
        rate = t.recent_rate(now=100.0 + i / 4)
    assert rate == pytest.approx(4.0, rel=0.05)
    assert t.recent_rate(now=140.0) < 1.0  # then nothing for half a minute
