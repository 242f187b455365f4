"""Emulated phones keep one leader while they profile, load and serve.

On the shipped phones profile a quarter-core phone used to stop hearing the others while it
profiled itself, elect itself with its own vote and lose the `serve` request the old leader
held. Here three phones (one core, half a core, a quarter core; shaped links) in their own
namespaces and cgroups serve SmolLM2 with `lp` (every phone profiles itself first) and then
`even`, and answer greedy queries at every phone with the monolithic tokens. The election
counters each phone reports must not move: no leader change, no election, the whole time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from meshllm import testbed
from tests.integration.mesh_helpers import PHONES3, cli, needs_phones, status

pytestmark = [pytest.mark.real_model, needs_phones]

PROMPT = "Name three colours of the rainbow."
TOKENS = 16
STILL = ("leader_changes", "elections", "stepdowns")


def _elections(homes: list[Path]) -> dict[str, dict]:
    out = {}
    for h in homes:
        st = status(h)
        assert st is not None, h
        out[h.name] = st["election"]
    return out


def test_phones_profile_serve_and_answer_with_one_leader(smollm_models, tmp_path):
    model = smollm_models["int4"]
    home0 = model.path.parent.parent
    expected = json.loads(
        cli(home0, "generate", "--model", model.name, PROMPT, "--max-tokens", str(TOKENS),
            "--monolithic", "--json", "--threads", "1", timeout=120).stdout
    )["token_ids"]  # fmt: skip
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
        shutil.copytree(model.path, dest, copy_function=os.link,
                        ignore=shutil.ignore_patterns("segments", "*.lock"))  # fmt: skip
        leader = status(homes[0])["leader"]
        before = _elections(homes)
        took = {}
        for partitioner in ("lp", "even"):
            t0 = time.monotonic()
            cli(homes[-1], "serve", model.name, "--partitioner", partitioner, "--balance",
                "none", "--timeout", "400", timeout=420)  # fmt: skip
            took[partitioner] = time.monotonic() - t0
            for home in homes:
                out = cli(home, "query", PROMPT, "--max-tokens", str(TOKENS), "--json",
                          timeout=300)  # fmt: skip
                assert json.loads(out.stdout)["token_ids"] == expected, (partitioner, home.name)
        after = _elections(homes)
        print(f"\nserve took {took}; elections before {before}\nafter {after}")
        for name in after:
            for key in STILL:
                assert after[name][key] == before[name][key], (name, key, before, after)
        assert {status(h)["leader"] for h in homes} == {leader}
    finally:
        testbed.down(root)
