#!/usr/bin/env python3
"""Benchmark: the planner on emulated phones (needs root), against the simple splits.

Starts the testbed of a device-class profile (each peer in its own network namespace with a
shaped link and its own CPU quota), imports SmolLM2 on the first phone, and for each plan in
one run serves the model and measures:
  * single-request decode tokens/s (median of --rounds queries) and the planner's predicted
    step time next to the measured one (1 / tokens per second),
  * aggregate tokens/s with 4 concurrent requests sent to different phones,
for ``even`` (equal layers), ``memory`` (layers by memory, exo's split) and ``lp`` with both
objectives. Also times the MILP on random 64-layer x 8-peer instances. Prints a table and
writes JSON.

    sudo .venv/bin/python tools/bench_planner.py [--profile configs/testbed/phones.toml]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from meshllm.control.client import call, call_stream  # noqa: E402
from meshllm.model.importer import import_model  # noqa: E402
from meshllm.model.store import ModelStore  # noqa: E402
from tools.bench_mesh_generation import PROMPTS  # noqa: E402  (the same prompts)

# lp first: it has every peer profile itself, and those profiles then price the other plans.
PLANS = [("lp", "latency"), ("lp", "throughput"), ("even", None), ("memory", None)]


def query(home: Path, prompt: str, tokens: int) -> dict:
    return call_stream(home, "query", None, timeout=900, prompt=prompt, max_tokens=tokens)


def serve(home: Path, homes: list[Path], model: str, partitioner: str, objective: str | None):
    args = {"model": model, "partitioner": partitioner, "wait_s": 600}
    if objective:
        args["objective"] = objective
    plan = call(home, "serve", timeout=620, **args)["plan"]
    deadline = time.monotonic() + 600
    while True:
        st = call(home, "status")["serving"]
        if st["ready"] and st["plan"]["epoch"] == plan["epoch"]:
            return st["plan"]
        if time.monotonic() > deadline:
            raise SystemExit(f"{partitioner} plan not ready in 600 s")
        time.sleep(0.3)


def elections(homes: list[Path]) -> dict[str, dict]:
    """Each peer's election counters and heartbeat lateness, by peer name, with the longest
    silence it heard from each other peer."""
    out = {}
    for h in homes:
        st = call(h, "status")
        gaps = {p["name"]: p.get("gap_max_s", 0.0) for p in st["peers"]}
        out[st["self"]["name"]] = {**st["election"], "gap_from": gaps}
    return out


def election_report(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """What changed while the benchmark ran: on a healthy mesh, no leader change at all."""
    keys = ("leader_changes", "elections", "prevotes", "stepdowns", "hb_gaps_over_dead")
    return {
        name: {
            **{k: after[name][k] - before[name][k] for k in keys},
            "hb_late_max_s": after[name]["hb_late_max_s"],
            "hb_gap_max_s": after[name]["hb_gap_max_s"],
            "hb_send_max_s": after[name].get("hb_send_max_s", 0.0),
            "gap_from": after[name]["gap_from"],
        }
        for name in after
    }


def measure(homes: list[Path], tokens: int, rounds: int, concurrent: bool) -> dict:
    query(homes[0], "Hello", 8)  # warm-up: first-run allocations on every stage
    singles = [query(homes[i % len(homes)], PROMPTS[0], tokens) for i in range(rounds)]
    out = {
        "single_tok_s": statistics.median(r["decode_tokens_per_s"] for r in singles),
        "ttft_s": statistics.median(r["ttft_s"] for r in singles),
    }
    if concurrent:
        jobs = [(homes[i % len(homes)], PROMPTS[i]) for i in range(4)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            res = list(pool.map(lambda j: query(j[0], j[1], tokens), jobs))
        out["aggregate4_tok_s"] = sum(len(r["token_ids"]) for r in res) / (time.perf_counter() - t0)
    return out


def solve_times(instances: int) -> dict:
    """MILP solve time on random 64-layer x 8-peer instances (both objectives)."""
    from meshllm.plan import Device, PlanProblem, solve_milp

    rng = random.Random(7)
    out = {}
    for objective in ("throughput", "latency"):
        times = []
        for _ in range(instances):
            layers, peers = 64, 8
            devices = tuple(
                Device(
                    name=f"d{i}",
                    layer_s=(rng.uniform(0.5e-3, 4e-3),) * layers,
                    first_s=rng.uniform(0, 1e-3),
                    last_s=rng.uniform(1e-3, 8e-3),
                    memory_bytes=rng.randint(200, 1200) << 20,
                )
                for i in range(peers)
            )
            link = tuple(
                tuple(0.0 if i == j else rng.uniform(2e-4, 3e-3) for j in range(peers))
                for i in range(peers)
            )
            problem = PlanProblem(
                layer_bytes=(20 << 20,) * layers,
                first_bytes=100 << 20,
                last_bytes=100 << 20,
                devices=devices,
                link_s=link,
                return_s=link,
                objective=objective,
            )
            t = time.perf_counter()
            solve_milp(problem)
            times.append(time.perf_counter() - t)
        out[objective] = {
            "median_ms": round(statistics.median(times) * 1e3, 2),
            "max_ms": round(max(times) * 1e3, 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "configs" / "testbed" / "phones.toml"))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-concurrent", action="store_true", help="Skip the 4-request runs.")
    ap.add_argument("--solver-instances", type=int, default=20)
    ap.add_argument(
        "--home", default=os.environ.get("MESHLLM_HOME", REPO / ".cache" / "bench-home")
    )
    ap.add_argument("--out", default=REPO / "bench-results" / "planner.json")
    args = ap.parse_args()
    testbed.exit_on_sigterm()  # stopped by `timeout`, it still takes its testbed down
    if os.geteuid() != 0:
        raise SystemExit("this benchmark puts peers in network namespaces and cgroups: run as root")
    store = ModelStore(Path(args.home) / "models")
    name = f"smollm2-135m-instruct-{args.precision}"
    import_model(
        store.dir,
        None,
        precision=args.precision,
        name=name,
        report=lambda m: print(m, file=sys.stderr),
    )
    model = store.get(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peers = testbed.up(root, profile=Path(args.profile), report=print)
        homes = [Path(p.home) for p in peers]
        classes = {
            call(h, "status")["self"]["id"]: p.device_class
            for h, p in zip(homes, peers, strict=True)
        }
        try:
            shutil.copytree(
                model.path,
                homes[0] / "models" / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns("segments", "*.lock"),
            )
            time.sleep(3)  # the daemon notices the import and advertises it on heartbeats
            before = elections(homes)
            for partitioner, objective in PLANS:
                t_serve = time.perf_counter()
                plan = serve(homes[-1], homes, name, partitioner, objective)
                serve_s = time.perf_counter() - t_serve
                m = measure(homes, args.tokens, args.rounds, not args.no_concurrent)
                pred = plan.get("predicted") or {}
                measured_step = 1.0 / m["single_tok_s"]
                row = {
                    "partitioner": partitioner,
                    "objective": objective or "-",
                    "stages": [[classes.get(p, p[-6:]), a, b] for p, a, b in plan["stages"]],
                    "predicted_step_s": pred.get("step_s"),
                    "predicted_stage_s": pred.get("stage_s"),
                    "measured_step_s": measured_step,
                    "serve_s": round(serve_s, 2),
                    **m,
                }
                if pred.get("step_s"):
                    row["prediction_error"] = pred["step_s"] / measured_step - 1
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            election = election_report(before, elections(homes))
        finally:
            testbed.down(root)
    base = next(r for r in rows if r["partitioner"] == "even")
    for r in rows:
        r["single_vs_even"] = r["single_tok_s"] / base["single_tok_s"]
        if "aggregate4_tok_s" in r:
            r["aggregate4_vs_even"] = r["aggregate4_tok_s"] / base["aggregate4_tok_s"]
    solver = solve_times(args.solver_instances)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "planner",
                "profile": str(args.profile),
                "precision": args.precision,
                "tokens": args.tokens,
                "results": rows,
                "solver_64x8": solver,
                "elections": election,
            },
            indent=2,
        )
    )
    print(
        f"\n{'plan':16} {'stages':44} {'pred ms':>7} {'meas ms':>7} {'err':>6} "
        f"{'tok/s':>6} {'x even':>6} {'agg@4':>6} {'x even':>6}"
    )
    for r in rows:
        stages = " ".join(f"{c}:{a}-{b}" for c, a, b in r["stages"])
        pred = r["predicted_step_s"]
        print(
            f"{r['partitioner'] + '/' + r['objective']:16} {stages:44} "
            f"{pred * 1e3 if pred else float('nan'):>7.1f} {r['measured_step_s'] * 1e3:>7.1f} "
            f"{100 * r.get('prediction_error', float('nan')):>5.0f}% "
            f"{r['single_tok_s']:>6.1f} {r['single_vs_even']:>6.2f} "
            f"{r.get('aggregate4_tok_s', float('nan')):>6.1f} "
            f"{r.get('aggregate4_vs_even', float('nan')):>6.2f}"
        )
    print(
        f"\n{'peer':10} {'leader chg':>10} {'elections':>9} {'prevotes':>8} "
        f"{'gaps>dead':>9} {'hb late max':>11} {'hb gap max':>10} {'send max':>8}"
    )
    for peer, e in election.items():
        print(
            f"{peer:10} {e['leader_changes']:>10} {e['elections']:>9} {e['prevotes']:>8} "
            f"{e['hb_gaps_over_dead']:>9} {e['hb_late_max_s']:>10.2f}s "
            f"{e['hb_gap_max_s']:>9.2f}s {e['hb_send_max_s']:>7.2f}s"
        )
    for peer, e in election.items():
        print(
            f"{peer} heard silences of at most: "
            + ", ".join(f"{p} {g:.2f} s" for p, g in sorted(e["gap_from"].items()))
        )
    print(
        "serve took: "
        + ", ".join(f"{r['partitioner']}/{r['objective']} {r['serve_s']:.1f} s" for r in rows)
    )
    print(f"\nMILP solve, 64 layers x 8 peers: {solver}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
