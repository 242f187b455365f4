"""A peer killed by its memory cap while holding a stage offers less from then on."""

from __future__ import annotations

import pytest

from meshllm.pipeline import memory_lesson as ml
from meshllm.pipeline.profiling import worker_profile
from tests.unit.test_profile import profile


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The OOM kill count this process's memory cgroup reports (None: no memory cgroup)."""
    count: list[int | None] = [0]
    monkeypatch.setattr(ml, "_oom_kills", lambda: count[0])
    return count


def test_killed_holding_a_stage_teaches_the_peer_to_offer_less(tmp_path, kills) -> None:
    ml.holding(tmp_path, 300 << 20)
    kills[0] = 1  # the kernel killed the daemon: no clean stop removed the note
    assert ml.learn_at_start(tmp_path) == int((300 << 20) * ml.MARGIN)
    assert not (tmp_path / ml.HOLDING).exists()
    # Kept across later starts; a smaller stage that kills it again lowers it further.
    assert ml.learn_at_start(tmp_path) == int((300 << 20) * ml.MARGIN)
    ml.holding(tmp_path, 200 << 20)
    kills[0] = 2
    assert ml.lesson(tmp_path) == int((300 << 20) * ml.MARGIN)
    assert ml.learn_at_start(tmp_path) == int((200 << 20) * ml.MARGIN)
    # The planner offers no more than the lesson, whatever the memory says.
    prof = profile(memory_bytes=4 << 30, memory_exact=True, learned_max_bytes=ml.lesson(tmp_path))
    assert worker_profile("p", prof, 30, 0.7).memory_bytes == int((200 << 20) * ml.MARGIN)


def test_no_lesson_from_a_clean_stop_a_crash_or_a_device_that_cannot_say(tmp_path, kills) -> None:
    ml.holding(tmp_path, 300 << 20)
    ml.released(tmp_path)  # a clean stop
    kills[0] = 5
    assert ml.learn_at_start(tmp_path) is None
    ml.holding(tmp_path, 300 << 20)  # a crash that was not the kernel's OOM killer
    assert ml.learn_at_start(tmp_path) is None
    kills[0] = None  # no memory cgroup: nothing is noted, nothing learned
    ml.holding(tmp_path, 300 << 20)
    assert not (tmp_path / ml.HOLDING).exists() and ml.learn_at_start(tmp_path) is None


@pytest.mark.parametrize(
    "text", ["", "[]", "{}", '{"max_stage_bytes": -1}', '{"max_stage_bytes": "9"}', "\xff"]
)
def test_a_lesson_file_that_does_not_decode_is_ignored(tmp_path, text) -> None:
    (tmp_path / ml.LESSON).write_text(text, errors="surrogateescape")
    assert ml.lesson(tmp_path) is None
