"""A peer dies mid-generation: the query completes, with exactly the whole model's tokens.

Real daemons on loopback, the real SmolLM2 (int4). A middle stage, then the leader, is killed
with SIGKILL while a 64-token greedy query is streaming; the leader (a new one, in the second
case) re-plans over the survivors and the coordinator replays the request on the new plan.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from meshllm import testbed
from meshllm.control.client import call_stream
from tests.integration.mesh_helpers import cli, status, wait_for

pytestmark = pytest.mark.real_model
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
TOKENS = 64


@pytest.fixture(scope="module")
def oracle(smollm_models):
    model = smollm_models["int4"]
    home = model.path.parent.parent
    out = cli(
        home,
        "generate",
        "--model",
        model.name,
        PROMPT,
        "--max-tokens",
        str(TOKENS),
        "--monolithic",
        "--json",
        "--threads",
        "1",
        timeout=120,
    )
    ids = json.loads(out.stdout)["token_ids"]
    assert len(ids) == TOKENS  # long enough to be interrupted mid-way
    return ids


def serve_from_a_survivor(m, model) -> tuple[list[str], str, int]:
    """The model imported on a peer that is not the leader (the source must survive: it is
    where every other peer gets its segment files), and served. (peer ids, leader, source)"""
    leader = m.status(0)["leader"]
    ids = [m.status(i)["self"]["id"] for i in range(len(m.homes))]
    # Stages follow the peers' sorted ids (even split): the source takes an end of the
    # pipeline, so a middle stage that is neither the source nor the leader exists.
    ends = [ids.index(min(ids)), ids.index(max(ids))]
    source = next(i for i in ends if ids[i] != leader)
    # The daemon notices the new model within seconds and advertises it; serve retries.
    # No balancer: layers it moved on a busy machine would change which stage is the victim.
    m.give_model(model, at=source, restart=False)
    m.serve(model, "--partitioner", "even", "--balance", "none", at=source, timeout=120)
    return ids, leader, source


def query_and_kill(home: Path, victim_pid: int, after_tokens: int = 8) -> tuple[dict, float]:
    """Stream a query at *home*; SIGKILL *victim_pid* once some tokens have arrived."""
    seen = threading.Event()
    count = 0
    result: dict = {}

    def on_event(ev: dict) -> None:
        nonlocal count
        if "token" in ev:
            count += 1
            if count == after_tokens:
                seen.set()

    def run() -> None:
        try:
            result["answer"] = call_stream(
                home, "query", on_event, timeout=300, prompt=PROMPT, max_tokens=TOKENS
            )
        except Exception as exc:  # reported below, with the daemon logs' context
            result["error"] = repr(exc)

    t = threading.Thread(target=run)
    t.start()
    assert seen.wait(120), f"no tokens streamed: {result}"
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    t.join(300)
    assert not t.is_alive()
    assert "answer" in result, result.get("error")
    return result["answer"], time.monotonic() - killed_at


@pytest.mark.parametrize("victim", ["middle", "leader"])
def test_query_survives_a_peer_killed_mid_generation(victim, smollm_models, oracle, mesh):
    model = smollm_models["int4"]
    with mesh(4) as m:
        ids, leader, source = serve_from_a_survivor(m, model)
        peers, homes = m.peers, m.homes
        plan = status(homes[source])["serving"]["plan"]
        stage_peers = [s[0] for s in plan["stages"]]
        if victim == "leader":
            target = ids.index(leader)
        else:  # a stage in the middle of the pipeline, neither the source nor the leader
            middle = [ids.index(p) for p in stage_peers[1:-1]]
            target = next(i for i in middle if i != source and ids[i] != leader)
        coordinator = next(i for i in range(len(homes)) if i not in (target, source))
        answer, took = query_and_kill(homes[coordinator], peers[target].pid)
        assert answer["token_ids"] == oracle
        rec = answer["recoveries"]
        assert len(rec) >= 1 and answer["plan_epoch"] > plan["epoch"]
        print(
            f"\n{victim} killed: recovered after {rec[0]['tokens_done']} tokens, waited "
            f"{rec[0]['wait_s']:.2f} s for the new plan; query done {took:.2f} s after the kill"
        )
        survivors = [h for i, h in enumerate(homes) if i != target]
        new_plan = status(survivors[0])["serving"]["plan"]
        assert ids[target] not in [s[0] for s in new_plan["stages"]]
        if victim == "leader":
            assert wait_for(lambda: status(survivors[0])["leader"] not in (None, leader), 10)
        # The mesh goes on serving.
        again = cli(survivors[-1], "query", PROMPT, "--max-tokens", "8", "--json", timeout=120)
        assert json.loads(again.stdout)["token_ids"] == oracle[:8]


def test_not_enough_peers_is_a_clear_error_and_serving_resumes(smollm_models, mesh):
    """With the model's only source gone there is no plan; it comes back with the source."""
    model = smollm_models["int4"]
    with mesh(3) as m:
        _ids, _leader, source = serve_from_a_survivor(m, model)
        peers, homes = m.peers, m.homes
        os.kill(peers[source].pid, signal.SIGKILL)
        other = next(i for i in range(3) if i != source)

        def refused() -> str | None:
            proc = cli(homes[other], "query", "Hi", "--max-tokens", "2", check=False, timeout=60)
            return proc.stderr if proc.returncode and "cannot serve" in proc.stderr else None

        msg = wait_for(refused, 30)
        assert msg and "Traceback" not in msg and "no live peer has imported" in msg
        # The source returns: the leader re-plans and the mesh serves again.
        proc = testbed.start_daemon(homes[source])
        testbed.wait_ready(homes[source], proc)
        peers[source] = testbed.TestbedPeer(source, str(homes[source]), proc.pid)
        testbed.save_state(m.root, peers)

        def answers() -> bool:
            q = cli(
                homes[other],
                "query",
                PROMPT,
                "--max-tokens",
                "4",
                "--json",
                check=False,
                timeout=120,
            )
            return q.returncode == 0 and len(json.loads(q.stdout)["token_ids"]) == 4

        assert wait_for(answers, 90, interval=1.0)
