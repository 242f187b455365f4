#!/usr/bin/env python3
"""Benchmark: mesh formation, leader failover and idle memory of real daemons on loopback.

Each trial starts N daemons (each joining through the previous one), measures the time until
every peer reports the same members and the same single leader, samples each daemon's resident
memory after an idle period, then SIGKILLs the leader and measures the time until the survivors
agree on a new one. Prints a table and writes JSON.

    .venv/bin/python tools/bench_mesh.py [--peers 4] [--trials 3] [--idle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from tests.integration.mesh_helpers import agreement, status, wait_for  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trial(n: int, idle: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        peers = testbed.up(root, n)  # returns once the peers agree on members and leader
        homes = [Path(p.home) for p in peers]
        try:
            _, leader = wait_for(lambda: agreement(homes), timeout=30, interval=0.02)
            formed = time.monotonic()
            time.sleep(idle)
            rss = [rss_mib(p.pid) for p in peers]
            victim = next(
                p for p, h in zip(peers, homes, strict=True) if status(h)["self"]["id"] == leader
            )
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            rest = [h for p, h in zip(peers, homes, strict=True) if p is not victim]
            wait_for(lambda: agreement(rest), timeout=30, interval=0.02)
            failover = time.monotonic() - killed
        finally:
            testbed.down(root)
    return {
        "up_and_formed_s": round(formed - t0, 3),
        "failover_s": round(failover, 3),
        "idle_rss_mib": [round(x, 1) for x in rss],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before sampling memory")
    ap.add_argument("--out", default=REPO / "bench-results" / "mesh.json")
    args = ap.parse_args()
    testbed.exit_on_sigterm()  # stopped by `timeout`, it still takes its testbed down
    trials = [trial(args.peers, args.idle) for _ in range(args.trials)]
    rss = [x for t in trials for x in t["idle_rss_mib"]]
    summary = {
        "peers": args.peers,
        "trials": trials,
        "median_up_and_formed_s": statistics.median(t["up_and_formed_s"] for t in trials),
        "median_failover_s": statistics.median(t["failover_s"] for t in trials),
        "max_failover_s": max(t["failover_s"] for t in trials),
        "median_idle_rss_mib": statistics.median(rss),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"{'trial':>5} {'start 4 daemons + agree s':>25} {'failover s':>10}  idle RSS MiB")
    for i, t in enumerate(trials):
        print(f"{i:>5} {t['up_and_formed_s']:>25.2f} {t['failover_s']:>10.2f}  {t['idle_rss_mib']}")
    print(
        f"median failover {summary['median_failover_s']:.2f} s "
        f"(max {summary['max_failover_s']:.2f}), "
        f"median idle RSS {summary['median_idle_rss_mib']:.1f} MiB\nwritten to {out}"
    )


if __name__ == "__main__":
    main()
