"""A model bigger than any one phone, served by four emulated phones under enforced memory caps.

The model is SmolLM2-135M's exact shape in float32 with seeded random weights (`model synth`):
514 MiB of weights, more than any phone's cap. A laptop that runs no layers (`stages = false`)
holds the files; four phones, each in a cgroup memory controller capped below the model's
weight bytes, serve it with the `lp` plan. Greedy tokens asked at a phone that is not the
source must equal the whole model's, run outside the caps, and no phone may be OOM-killed.
Then memory runs out on the phone of the second stage (another app takes it: the kernel kills
the daemon, as Android's low-memory killer would): the mesh serves on without it, with the same
tokens; restarted, that phone has learned not to take such a load again. Last, two phones leave
and `serve` on the rest fails at once, saying how many MiB are short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshllm import netbed, testbed
from meshllm.model.segment_files import read_segment_info
from meshllm.model.store import ImportedModel
from meshllm.pipeline import memory_lesson
from tests.integration.mesh_helpers import (
    cli,
    link_model,
    monolithic,
    needs_phones,
    status,
    wait_for,
)

pytestmark = [pytest.mark.real_model, needs_phones]

PHONE_MB = 480
PROFILE = f"""
[class.laptop]
cpu = 1.0
bandwidth_mbit = 200
memory_mb = 0
stages = false

[class.phone]
cpu = 0.5
bandwidth_mbit = 100
memory_mb = {PHONE_MB}

[[peer]]
class = "laptop"
name = "laptop"

[[peer]]
class = "phone"
name = "phone-1"

[[peer]]
class = "phone"
name = "phone-2"

[[peer]]
class = "phone"
name = "phone-3"

[[peer]]
class = "phone"
name = "phone-4"
"""
PROMPT = "Tell me about the sea."
# Another app on the phone, in the foreground: it takes more memory than the daemon leaves free
# (but less than the cap). The daemon, a background app, is the OOM killer's first choice
# (oom_score_adj 1000, as Android ranks background apps), so it goes, as it would on a phone.
OTHER_APP = """
import mmap
size = %d << 20
block = mmap.mmap(-1, size)
for i in range(0, size, 4096):
    block[i] = 1
"""
TOKENS = 24


@pytest.fixture(scope="module")
def big_model(model_store) -> ImportedModel:
    from meshllm.model.synth import synth_model

    name = "smollm2-135m-synth-fp32"
    synth_model(model_store.dir, "smollm2-135m", precision="fp32", name=name)
    return model_store.get(name)


def test_phones_serve_a_model_none_of_them_could_hold(big_model, tmp_path):
    weights = big_model.manifest.total_weight_bytes
    assert weights > PHONE_MB << 20  # the point: no phone could hold the model alone
    expected = monolithic(big_model, PROMPT, TOKENS, timeout=300)
    profile = tmp_path / "bigger.toml"
    profile.write_text(PROFILE)
    root = tmp_path / "tb"
    # KV reserved for two requests at a time (not four): three phones can then carry the model
    # when one is lost, and two cannot.
    peers = testbed.up(root, profile=profile, config={"plan": {"concurrency": "2"}})
    homes = [Path(p.home) for p in peers]
    laptop, phones = homes[0], homes[1:]
    try:
        link_model(big_model, laptop)
        serve = ("serve", big_model.name, "--partitioner", "lp", "--balance", "none")
        cli(phones[0], *serve, "--timeout", "500", timeout=520)
        out = cli(phones[-1], "query", PROMPT, "--max-tokens", str(TOKENS), "--json", timeout=300)
        assert json.loads(out.stdout)["token_ids"] == expected

        plan = status(phones[-1])["serving"]["plan"]
        ids = {h: status(h)["self"]["id"] for h in homes}
        staged = {s[0] for s in plan["stages"]}
        assert ids[laptop] not in staged and plan["source"] == ids[laptop]
        assert len(staged) >= 2  # the model was split across phones
        memory = {e["index"]: e for e in testbed.status(root)}
        print(f"\nplan {plan['stages']}; weights {weights >> 20} MiB; per phone peak/cap MiB:")
        for i in range(1, len(homes)):
            e = memory[i]
            print(
                f"  phone-{i}: daemon peak resident {e['resident_peak_bytes'] >> 20}, cgroup peak "
                f"(page cache too) {e['memory_peak_bytes'] >> 20}, anon now "
                f"{e['memory_anon_bytes'] >> 20}, cap {e['memory_limit_bytes'] >> 20}"
            )
        for i in range(1, len(homes)):
            e = memory[i]
            assert e["memory_limit_bytes"] == PHONE_MB << 20
            assert e["memory_peak_bytes"] <= e["memory_limit_bytes"]
            assert e["oom_kills"] == 0, e
            assert testbed.is_our_daemon(peers[i].pid), f"phone {i} died"

        # --- memory runs out on the second stage's phone: the daemon is killed -----------
        victim = next(i for i, h in enumerate(homes) if ids[h] == plan["stages"][1][0])
        segments = laptop / "models" / big_model.name / "segments"
        asker = next(h for h in reversed(phones) if h != homes[victim])  # a phone that stays
        net = testbed.load_network(root)
        np_victim = net.peers[victim]
        Path(f"/proc/{peers[victim].pid}/oom_score_adj").write_text("1000")
        # (The app may go too: the daemon's memory is freed a moment after the kill.)
        subprocess.run(
            netbed.peer_command(np_victim, [sys.executable, "-c", OTHER_APP % (PHONE_MB - 150)]),
            capture_output=True,
            timeout=120,
        )
        wait_for(lambda: not testbed.is_our_daemon(peers[victim].pid), timeout=30)
        assert testbed.status(root)[victim]["oom_kills"] >= 1

        # The mesh re-plans without it and answers with the same tokens.
        def replanned() -> bool:
            serving = (status(asker) or {}).get("serving") or {}
            now = serving.get("plan") or {}
            return bool(serving.get("ready")) and now.get("epoch", 0) > plan["epoch"]

        wait_for(replanned, timeout=300)
        out = cli(asker, "query", PROMPT, "--max-tokens", str(TOKENS), "--json", timeout=300)
        got = json.loads(out.stdout)
        assert got["token_ids"] == expected
        survivors = status(asker)["serving"]["plan"]
        assert ids[homes[victim]] not in {s[0] for s in survivors["stages"]}
        # Back again, it has learned: no plan gives it as many layers' bytes as it died with.
        proc = testbed.start_daemon(homes[victim], wrap=netbed.peer_command(np_victim, []))
        testbed.wait_ready(homes[victim], proc)
        peers[victim] = testbed.TestbedPeer(
            victim,
            str(homes[victim]),
            proc.pid,
            np_victim.device_class,
            np_victim.netns,
            np_victim.address,
        )
        testbed.save_state(root, peers)
        lesson = memory_lesson.lesson(homes[victim])
        died_with = read_segment_info(segments / f"{plan['stages'][1][1]}-{plan['stages'][1][2]}")
        assert lesson is not None and died_with is not None
        assert lesson == int(died_with.weight_bytes * memory_lesson.MARGIN)
        wait_for(lambda: len((status(phones[0]) or {}).get("members", ())) == 5, timeout=60)
        cli(phones[0], *serve, "--timeout", "500", timeout=520)
        wait_for(lambda: (status(asker) or {}).get("serving", {}).get("ready"), timeout=300)
        again = status(asker)["serving"]["plan"]
        mine = [s for s in again["stages"] if s[0] == ids[homes[victim]]]
        if mine:
            info = read_segment_info(segments / f"{mine[0][1]}-{mine[0][2]}")
            assert info is not None and info.weight_bytes <= lesson
        out = cli(asker, "query", PROMPT, "--max-tokens", str(TOKENS), "--json", timeout=300)
        assert json.loads(out.stdout)["token_ids"] == expected

        # --- two phones leave: the other two cannot hold it, and serve says so at once -----
        for home in phones[2:]:
            cli(home, "stop", timeout=60)
        wait_for(lambda: len((status(phones[0]) or {}).get("members", ())) == 3, timeout=60)
        failed = cli(phones[0], *serve, "--timeout", "300", timeout=320, check=False)
        assert failed.returncode != 0
        assert "MiB short" in failed.stderr, failed.stderr
    finally:
        testbed.down(root)
