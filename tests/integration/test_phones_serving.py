"""Emulated phones keep one leader while they profile, load and serve.

On the shipped phones profile a quarter-core phone used to stop hearing the others while it
profiled itself, elect itself with its own vote and lose the `serve` request the old leader
held. Here three phones (one core, half a core, a quarter core; shaped links) in their own
namespaces and cgroups serve SmolLM2 with each partitioner in turn (`lp` first: every phone
profiles itself), answer greedy queries at every phone with the monolithic tokens after each
`serve`, and then answer queries from two clients at once, at every phone in turn, for a
minute. The election counters each phone reports must not move: no leader change, no
election, the whole time.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from meshllm import testbed
from meshllm.control.client import call_stream
from tests.integration.mesh_helpers import PHONES3, cli, monolithic, needs_phones, status

pytestmark = [pytest.mark.real_model, needs_phones]

PROMPT = "Name three colours of the rainbow."
TOKENS = 16
STILL = ("leader_changes", "elections", "stepdowns")
PARTITIONERS = ("lp", "even", "memory")
READY_SLACK_S = 10.0  # from "ready" in the asker's status to `serve` returning
LOAD_S = 60.0  # how long the two clients keep asking (a load, not a wait for an event)


def _elections(homes: list[Path]) -> dict[str, dict]:
    out = {}
    for h in homes:
        st = status(h)
        assert st is not None, h
        out[h.name] = st["election"]
    return out


def test_phones_profile_serve_and_answer_with_one_leader(smollm_models, tmp_path):
    model = smollm_models["int4"]
    expected = monolithic(model, PROMPT, TOKENS)
    profile = tmp_path / "phones3.toml"
    profile.write_text(PHONES3)
    root = tmp_path / "tb"
    peers = testbed.up(root, profile=profile)
    homes = [Path(p.home) for p in peers]
    try:
        # The model on the flagship (hard links: no copy, no conversion); advertised within
        # seconds, and serve waits for it.
        dest = homes[0] / "models" / model.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            model.path,
            dest,
            copy_function=os.link,
            ignore=shutil.ignore_patterns("segments", "*.lock"),
        )
        leader = status(homes[0])["leader"]
        before = _elections(homes)
        took = {}
        for partitioner in PARTITIONERS:
            t0 = time.monotonic()
            watch = _ReadyWatch(homes[-1])
            cli(
                homes[-1],
                "serve",
                model.name,
                "--partitioner",
                partitioner,
                "--balance",
                "none",
                "--timeout",
                "400",
                timeout=420,
            )
            done = time.monotonic()
            took[partitioner] = done - t0
            # No slower than its own work: the answer comes as soon as the plan is ready
            # (the bug was an asker that waited out its timeout with the plan already live).
            ready_at = watch.stop()
            assert ready_at is not None and done - ready_at < READY_SLACK_S, (
                partitioner,
                ready_at and done - ready_at,
            )
            for home in homes:
                out = cli(home, "query", PROMPT, "--max-tokens", str(TOKENS), "--json", timeout=300)
                assert json.loads(out.stdout)["token_ids"] == expected, (partitioner, home.name)
        answers = _load(homes, expected)
        after = _elections(homes)
        print(
            f"\nserve took {took}; {answers} answers under load; elections before {before}"
            f"\nafter {after}"
        )
        for name in after:
            for key in STILL:
                assert after[name][key] == before[name][key], (name, key, before, after)
        assert {status(h)["leader"] for h in homes} == {leader}
    finally:
        testbed.down(root)


class _ReadyWatch:
    """Polls the asker's status while `serve` runs: when did a new plan first show as ready?"""

    def __init__(self, home: Path):
        st = status(home) or {}
        plan = (st.get("serving") or {}).get("plan") or {}
        self._epoch = plan.get("epoch", 0)
        self._home = home
        self._stop = threading.Event()
        self.ready_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.ready_at is None:
            stopping = self._stop.is_set()  # one last look after `serve` returned
            serving = (status(self._home) or {}).get("serving") or {}
            plan = serving.get("plan") or {}
            # (A serve the live plan already satisfies keeps its epoch.)
            if serving.get("ready") and (plan.get("epoch", 0) > self._epoch or stopping):
                self.ready_at = time.monotonic()
            if stopping:
                return
            self._stop.wait(0.2)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.ready_at


def _load(homes: list[Path], expected: list[int]) -> int:
    """Two clients ask in turn at every phone for LOAD_S seconds; every answer must be the
    monolithic one. Returns how many answers came."""
    stop_at = time.monotonic() + LOAD_S
    got: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []

    def client(start: int) -> None:
        i = start
        try:
            while time.monotonic() < stop_at:
                home = homes[i % len(homes)]
                out = call_stream(
                    home, "query", None, timeout=300, prompt=PROMPT, max_tokens=TOKENS
                )
                got.append((home.name, out["token_ids"]))
                i += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({name for name, _ in got}) == len(homes), got
    for name, ids in got:
        assert ids == expected, name
    return len(got)
