"""What `meshllm status` and `meshllm serve` print for people (the JSON is tested elsewhere)."""

from __future__ import annotations

from meshllm.commands.common import ProgressLine, bar
from meshllm.commands.peer import print_status
from meshllm.commands.serve import loading_line

A, B = (
    "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1",
    "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2",
)


def status(serving: dict) -> dict:
    return {
        "self": {"id": A, "name": "phone-a", "role": "leader", "addrs": []},
        "term": 2,
        "leader": A,
        "mesh_id": "m1",
        "members": [A, B],
        "peers": [
            {
                "id": B,
                "name": "phone-b",
                "role": "follower",
                "alive": True,
                "last_seen_s": 0.1,
                "addrs": ["/ip4/10.0.0.2/tcp/1"],
            }
        ],
        "serving": serving,
    }


PLAN = {
    "epoch": 3,
    "model": "m-int4",
    "partitioner": "lp",
    "balance": "threshold",
    "stages": [[A, 0, 20], [B, 20, 30]],
    "predicted": {"objective": "throughput", "step_s": 0.0123, "bottleneck_s": 0.007},
}


def test_status_shows_each_stage_with_memory_and_recent_speed(capsys):
    serving = {
        "plan": PLAN,
        "ready": True,
        "states": {A: {"epoch": 3, "state": "ready"}, B: {"epoch": 3, "state": "ready"}},
        "runtime": {
            A: {
                "rss_mb": 250.4,
                "stage_stats": {
                    "epoch": 3,
                    "recent_s": 0.0061,
                    "steps_per_s": 40.5,
                    "open_requests": 2,
                },
            },
            # A stage still reporting an older plan's figures shows none of them.
            B: {
                "rss_mb": 180.0,
                "stage_stats": {
                    "epoch": 2,
                    "recent_s": 0.5,
                    "steps_per_s": 9.0,
                    "open_requests": 1,
                },
            },
        },
        "profiles": {A: {"memory_bytes": 1024 << 20}},
        "balancer": {
            "last_decision": {"epoch": 2, "outcome": "replanned", "reason": "phone-b 2.1x slower"}
        },
    }
    print_status(status(serving))
    out = capsys.readouterr().out
    assert "serving m-int4  plan 3 (lp/throughput, balance threshold)  ready" in out
    rows = [r for r in map(str.split, out.splitlines()) if r and r[0].isdigit()]
    assert rows[0][2:] == ["phone-a", "0-20", "ready", "250", "1024", "6.1", "40.5", "2"]
    assert rows[1][2:] == ["phone-b", "20-30", "ready", "180", "-", "-", "-", "-"]
    assert "12.3 ms per token alone" in out
    assert "balancer, plan 2: replanned: phone-b 2.1x slower" in out


def test_serve_progress_names_peers_and_draws_fetch_bars():
    serving = {
        "plan": PLAN,
        "states": {A: {"state": "ready"}, B: {"state": "fetching", "progress": 0.5}},
    }
    line = loading_line(status(serving), PLAN)
    assert line == "phone-a 0-20: ready  phone-b 20-30: fetching [######......]  50%"
    assert bar(0) == "[............]   0%" and bar(1.0).endswith("100%")


def test_progress_line_prints_only_changes_when_not_a_terminal(capsys):
    p = ProgressLine()
    for line in ("a", "a", "b", "b", "c"):
        p.show(line)
    p.done()
    assert capsys.readouterr().err.splitlines() == ["a", "b", "c"]
