"""A stage's decode-step times, as the balancer and ``meshllm status`` read them.

The first steps after a plan goes live warm up (first-run allocations, caches); the next
ones make the stage's *baseline*; after that a moving average follows the *recent* cost. A
stage that slows down (a phone throttling, another app busy) shows it as recent over baseline.
"""

from __future__ import annotations

import time
from collections import deque


class StepTimes:
    WARMUP_STEPS, BASELINE_STEPS, EWMA = 4, 16, 0.2
    RATE_WINDOW_S = 10.0

    def __init__(self) -> None:
        self.steps = 0  # every step, replays and prompts too
        self.compute_s = 0.0  # their time, from start to result
        self.last_step_at = time.monotonic()  # when a step last finished (or the start)
        self.decode_steps = 0
        self.baseline_s = 0.0  # mean over the baseline steps (0: not measured yet)
        self.recent_s = 0.0  # the moving average since (the running mean before)
        self._baseline_sum = 0.0
        # (time, decode steps) marks for the recent step rate.
        self._rate_marks: deque[tuple[float, int]] = deque()

    def finished(self, spent: float, *, typical: bool, share: int = 1) -> None:
        """A step took *spent* seconds. *typical*: a plain decode step (replayed steps come
        in a burst right after a plan change: not typical load); a batch's time is shared by
        its *share* rows: what the stage costs a token."""
        self.steps += 1
        self.compute_s += spent
        self.last_step_at = time.monotonic()
        if typical:
            self.note(spent / share)

    def note(self, spent: float) -> None:
        """One decode step took *spent* seconds of this stage's compute."""
        self.decode_steps += 1
        n = self.decode_steps - self.WARMUP_STEPS
        if n <= 0:
            return
        if n <= self.BASELINE_STEPS:
            self._baseline_sum += spent
            self.recent_s = self._baseline_sum / n
            if n == self.BASELINE_STEPS:
                self.baseline_s = self.recent_s
            return
        self.recent_s += self.EWMA * (spent - self.recent_s)

    @property
    def measured(self) -> int:
        """Decode steps measured after the baseline (the balancer's evidence)."""
        return max(0, self.decode_steps - self.WARMUP_STEPS - self.BASELINE_STEPS)

    def recent_rate(self, now: float | None = None) -> float:
        """Decode steps per second over the last ~10 s (all requests together)."""
        now = time.monotonic() if now is None else now
        marks = self._rate_marks
        marks.append((now, self.decode_steps))
        while len(marks) > 2 and now - marks[1][0] >= self.RATE_WINDOW_S:
            marks.popleft()
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= 0.5 else 0.0
