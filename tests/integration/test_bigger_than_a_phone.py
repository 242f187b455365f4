"""A model bigger than any one phone, served by four emulated phones under enforced memory caps.

The model is SmolLM2-135M's exact shape in float32 with seeded random weights (`model synth`):
514 MiB of weights, more than any phone's cap. A laptop that runs no layers (`stages = false`)
holds the files; four phones, each in a cgroup memory controller capped below the model's
weight bytes, serve it with the `lp` plan. Greedy tokens asked at a phone that is not the
source must equal the whole model's, run outside the caps, and no phone may be OOM-killed.
Then two phones leave and `serve` on the rest fails at once, saying how many MiB are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshllm import testbed
from meshllm.model.store import ImportedModel
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
    peers = testbed.up(root, profile=profile)
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
            assert 0 < e["resident_peak_bytes"] < e["memory_limit_bytes"]
            assert e["oom_kills"] == 0, e
            assert testbed.is_our_daemon(peers[i].pid), f"phone {i} died"

        # --- two phones leave: the other two cannot hold it, and serve says so at once -----
        for home in phones[2:]:
            cli(home, "stop", timeout=60)
        wait_for(lambda: len((status(phones[0]) or {}).get("members", ())) == 3, timeout=60)
        failed = cli(phones[0], *serve, "--timeout", "300", timeout=320, check=False)
        assert failed.returncode != 0
        assert "MiB short" in failed.stderr, failed.stderr
    finally:
        testbed.down(root)
