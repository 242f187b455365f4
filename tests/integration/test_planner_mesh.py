"""The planner in a real mesh: peers profile themselves, the leader solves, tokens stay exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from meshllm import testbed
from tests.integration.mesh_helpers import cli, monolithic, restart, status

pytestmark = pytest.mark.real_model
PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def lp_mesh(smollm_models, mesh):
    model = smollm_models["int4"]
    with mesh(3) as m:
        m.give_model(model, at=0)
        out = m.serve(model, "--json", timeout=400)  # the default partitioner: lp
        yield {"model": model, "homes": m.homes, "root": m.root, "serve": json.loads(out.stdout)}


def test_lp_plan_is_made_from_every_peers_profile(lp_mesh):
    plan = lp_mesh["serve"]["plan"]
    sha = lp_mesh["model"].manifest.model_sha256
    assert plan["partitioner"] == "lp"
    predicted = plan["predicted"]
    assert predicted["step_s"] > 0 and len(predicted["stage_s"]) == len(plan["stages"])
    ids = set()
    for home in lp_mesh["homes"]:
        st = status(home)
        ids.add(st["self"]["id"])
        prof = st["serving"]["profile"]
        assert prof["model_sha"] == sha and prof["layer_s"] > 0 and prof["memory_bytes"] > 0
        others = set(prof["links"])
        assert len(others) == 2 and st["self"]["id"] not in others
        assert all(rtt > 0 and bw > 0 for rtt, bw in prof["links"].values())
    assert {s[0] for s in plan["stages"]} <= ids
    # Any peer's status shows every peer's profile for the served model.
    assert set(status(lp_mesh["homes"][0])["serving"]["profiles"]) == ids


def test_lp_mesh_answers_like_the_whole_model(lp_mesh):
    expected = monolithic(lp_mesh["model"], PROMPT)
    for home in lp_mesh["homes"]:
        out = cli(home, "query", PROMPT, "--max-tokens", "24", "--json", timeout=300)
        assert json.loads(out.stdout)["token_ids"] == expected


def test_profile_command_shows_every_peer(lp_mesh):
    out = cli(lp_mesh["homes"][1], "profile", "--json", timeout=300)
    result = json.loads(out.stdout)
    assert len(result["profiles"]) == 3 and all(result["profiles"].values())
    table = cli(lp_mesh["homes"][1], "profile", timeout=300).stdout
    assert re.search(r"LAYER ms", table) and len(table.strip().splitlines()) == 5


def test_requests_over_the_limits_get_clear_errors(lp_mesh):
    home = lp_mesh["homes"][1]
    too_many = cli(home, "query", "Hi", "--max-tokens", "100000", check=False, timeout=60)
    assert too_many.returncode == 1 and "max_new_tokens" in too_many.stderr
    long_prompt = " ".join(["word"] * 5000)  # over the default 4096 prompt tokens
    too_long = cli(home, "query", long_prompt, check=False, timeout=60)
    assert too_long.returncode == 1 and "max_prompt_tokens" in too_long.stderr
    assert "Traceback" not in too_many.stderr + too_long.stderr
    # Nothing was lost: the mesh still answers.
    out = cli(home, "query", PROMPT, "--max-tokens", "4", "--json", timeout=120)
    assert len(json.loads(out.stdout)["token_ids"]) == 4


def test_a_model_that_cannot_fit_is_a_clear_error(lp_mesh, tmp_path):
    # Every peer may give at most 1 MiB: the leader's solver finds no plan and says why.
    root = lp_mesh["root"]
    peers = testbed.load_state(root)
    for i, p in enumerate(peers):
        cfg = Path(p.home) / "config.toml"
        text = cfg.read_text()
        if "memory_limit_mb" not in text:
            text = text.replace("[peer]\n", "[peer]\nmemory_limit_mb = 1\n", 1)
        cfg.write_text(text)
        restart(root, peers, i)
        # Each restart listens on a new port: the next peer may stop only once the others have
        # heard this one's new address, or no peer would know where the last ones are.
        testbed.wait_for_mesh([Path(p.home) for p in peers], timeout=30)
    proc = cli(
        Path(peers[2].home),
        "serve",
        lp_mesh["model"].name,
        "--partitioner",
        "lp",
        check=False,
        timeout=400,
    )
    assert proc.returncode == 1
    assert "MiB" in proc.stderr and "Traceback" not in proc.stderr
    assert all(status(Path(p.home)) is not None for p in peers)  # every daemon still runs
