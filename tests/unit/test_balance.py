"""The built-in balancing policies decide from relative slowdowns, with enough evidence."""

from __future__ import annotations

from meshllm.balance import NoBalancing, Observation, StageObservation, ThresholdPolicy


def obs(*stages: tuple[str, int, float, float], threshold=1.5, min_steps=12) -> Observation:
    return Observation(
        epoch=3,
        age_s=10.0,
        slowdown_threshold=threshold,
        min_steps=min_steps,
        stages=tuple(
            StageObservation(p, i * 10, i * 10 + 10, n, base, recent)
            for i, (p, n, base, recent) in enumerate(stages)
        ),
    )


def test_a_stage_that_slowed_down_alone_triggers_a_replan():
    d = ThresholdPolicy().decide(
        obs(("a", 40, 0.010, 0.010), ("b", 40, 0.010, 0.041), ("c", 40, 0.008, 0.008))
    )
    assert d is not None and set(d.factors) == {"b"}
    assert 4.0 <= d.factors["b"] <= 4.2 and "b" in d.reason


def test_everyone_slower_alike_is_not_a_reason_to_move_layers():
    # More requests in flight, or the whole box busier: every stage slows the same.
    o = obs(("a", 40, 0.010, 0.020), ("b", 40, 0.010, 0.021), ("c", 40, 0.008, 0.016))
    assert ThresholdPolicy().decide(o) is None


def test_too_little_evidence_or_a_small_slowdown_keeps_the_plan():
    few = obs(("a", 40, 0.010, 0.010), ("b", 5, 0.010, 0.05), ("c", 40, 0.008, 0.008))
    small = obs(("a", 40, 0.010, 0.010), ("b", 40, 0.010, 0.013), ("c", 40, 0.008, 0.008))
    no_baseline = obs(("a", 40, 0.0, 0.010), ("b", 40, 0.0, 0.05))
    for o in (few, small, no_baseline):
        assert ThresholdPolicy().decide(o) is None


def test_none_never_rebalances():
    assert NoBalancing().decide(obs(("a", 99, 0.01, 0.01), ("b", 99, 0.01, 1.0))) is None
