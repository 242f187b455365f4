"""What a peer learns from being killed for memory: not to take that load again.

Before it loads a stage, a peer writes down the stage's weight bytes and how many OOM kills
its memory cgroup has seen so far (``holding.json`` in its home); a clean stop or a plan that
gives it no stage removes the note. A daemon that starts and finds the note, with more OOM
kills counted since, was killed holding that stage: it keeps the lesson (``memory_lesson.json``)
and from then on its profiles offer at most 90% of those bytes, so no leader gives it the same
load again. Without a memory cgroup (a device whose kernel says nothing) there is no lesson:
an unclean end alone does not say it was memory.

Both files are this peer's own, but are read as untrusted input all the same: anything that
does not decode is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from meshllm import cgroups

log = structlog.get_logger()

HOLDING = "holding.json"
LESSON = "memory_lesson.json"
MARGIN = 0.9  # of the bytes that were too many
_MAX = 1 << 50


def _oom_kills() -> int | None:
    """OOM kills in this process's memory cgroup, if it has a cap (None otherwise: a count
    of the whole machine's kills would not say this process hit its own limit)."""
    usage = cgroups.memory_usage(cgroups.own_cgroup("memory"))
    return usage["oom_kills"] if usage["memory_limit_bytes"] is not None else None


def _read_int(path: Path, key: str) -> int | None:
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX:
        return value
    return None


def _write(path: Path, obj: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def holding(home: Path, stage_bytes: int) -> None:
    """Note that this peer is about to hold a stage of *stage_bytes* weight bytes."""
    kills = _oom_kills()
    if kills is None:
        return  # nothing could tell later that memory was the cause
    try:
        _write(home / HOLDING, {"stage_bytes": stage_bytes, "oom_kills": kills})
    except OSError as exc:
        log.warning("holding_note_failed", reason=str(exc))


def released(home: Path) -> None:
    """This peer holds no stage any more (a clean stop, or a plan without one for it)."""
    (home / HOLDING).unlink(missing_ok=True)


def learn_at_start(home: Path) -> int | None:
    """At start: did the last run die of its memory cap holding a stage? Returns the lesson
    (the most weight bytes this peer will offer), new or kept from before; None if none."""
    note = home / HOLDING
    held = _read_int(note, "stage_bytes")
    before = _read_int(note, "oom_kills")
    now = _oom_kills()
    if held is not None and before is not None and now is not None and now > before:
        limit = int(held * MARGIN)
        old = lesson(home)
        if old is None or limit < old:
            _write(home / LESSON, {"max_stage_bytes": limit})
        log.warning("oom_killed_holding_a_stage", stage_mib=held >> 20, offers_mib=limit >> 20)
    note.unlink(missing_ok=True)
    return lesson(home)


def lesson(home: Path) -> int | None:
    """The most weight bytes this peer offers a stage, learned from an OOM kill; None if none."""
    return _read_int(home / LESSON, "max_stage_bytes")
