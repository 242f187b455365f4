#!/usr/bin/env python3
"""Benchmark: solve time of the layer-assignment MILP (HiGHS) against the exact DP oracle.

Generates random feasible instances (64 layers x 8 peers by default: mixed peer speeds, a
slow peer now and then, memory caps that force several peers, 0.1-5 ms links), solves each with
both solvers for both objectives, checks they agree, and reports median / p90 / max solve
milliseconds per solver and objective plus the median per-instance ratio milp/dp. Prints a table
and writes JSON.

    .venv/bin/python tools/bench_solver.py [--instances 100] [--out bench-results/solver.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import highspy  # noqa: E402

from meshllm.plan import Device, PlanProblem, solve_dp, solve_milp  # noqa: E402
from meshllm.plan.problem import greedy_fill  # noqa: E402

MIB = 2**20
MS = 1e-3
OBJECTIVES = ("throughput", "latency")
SOLVERS = {"milp": solve_milp, "dp": solve_dp}


def random_instance(rng: random.Random, layers: int, peers: int) -> PlanProblem:
    """One random instance; may be infeasible (the caller retries)."""
    layer_bytes = tuple(rng.randint(80 * MIB, 120 * MIB) for _ in range(layers))
    first_bytes, last_bytes = rng.randint(50, 150) * MIB, rng.randint(50, 150) * MIB
    total = sum(layer_bytes) + first_bytes + last_bytes
    pressure = rng.uniform(1.2, 3.0)  # all peers together offer 1.2-3x what the model needs
    devices = []
    for p in range(peers):
        speed = rng.choice([0.5, 1.0, 1.0, 1.5, 2.0, 8.0])  # 8x: a peer worth leaving out
        layer_s = tuple(speed * MS * rng.uniform(0.95, 1.05) for _ in range(layers))
        cap = int(total * pressure / peers * rng.uniform(0.3, 1.7))
        first_s, last_s = speed * rng.uniform(0, 1) * MS, speed * rng.uniform(2, 6) * MS
        devices.append(Device(f"peer{p}", layer_s, first_s, last_s, cap))
    link = _hops(rng, peers)
    ret = link if rng.random() < 0.5 else _hops(rng, peers)
    return PlanProblem(layer_bytes, first_bytes, last_bytes, tuple(devices), link, ret)


def _hops(rng: random.Random, peers: int) -> tuple[tuple[float, ...], ...]:
    return tuple(
        tuple(0.0 if i == j else rng.uniform(0.1, 5.0) * MS for j in range(peers))
        for i in range(peers)
    )


def feasible_instances(count: int, layers: int, peers: int, seed: int) -> list[PlanProblem]:
    rng = random.Random(seed)
    out: list[PlanProblem] = []
    while len(out) < count:
        problem = random_instance(rng, layers, peers)
        fill = greedy_fill(problem)  # exact memory-feasibility test
        if fill and fill[-1][2] == layers:
            out.append(problem)
    return out


def timed(solve, problem: PlanProblem) -> tuple[float, float]:
    """(wall-clock seconds of the whole call, objective value)."""
    t0 = time.perf_counter()
    solution = solve(problem)
    return time.perf_counter() - t0, solution.objective_value


def stats_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "median_ms": round(1000 * statistics.median(ordered), 3),
        "p90_ms": round(1000 * p90, 3),
        "max_ms": round(1000 * ordered[-1], 3),
        "mean_ms": round(1000 * statistics.fmean(ordered), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", default=REPO / "bench-results" / "solver.json")
    args = ap.parse_args()

    problems = feasible_instances(args.instances, args.layers, args.devices, args.seed)
    for solve in SOLVERS.values():  # warm-up: imports, HiGHS start-up, numpy first calls
        for objective in OBJECTIVES:
            solve(dataclasses.replace(problems[0], objective=objective))

    times: dict[str, dict[str, list[float]]] = {o: {s: [] for s in SOLVERS} for o in OBJECTIVES}
    mismatches = 0
    for problem in problems:
        for objective in OBJECTIVES:
            posed = dataclasses.replace(problem, objective=objective)
            values = {}
            for name, solve in SOLVERS.items():
                elapsed, values[name] = timed(solve, posed)
                times[objective][name].append(elapsed)
            mismatches += not math.isclose(values["milp"], values["dp"], rel_tol=1e-6)

    results = []
    for objective in OBJECTIVES:
        ratios = [
            m / d for m, d in zip(times[objective]["milp"], times[objective]["dp"], strict=True)
        ]
        for name in SOLVERS:
            row = {"objective": objective, "solver": name, **stats_ms(times[objective][name])}
            if name == "milp":
                row["median_ratio_milp_over_dp"] = round(statistics.median(ratios), 3)
            results.append(row)

    meta = {
        "benchmark": "solver",
        "instances": args.instances,
        "layers": args.layers,
        "devices": args.devices,
        "seed": args.seed,
        "mismatches": mismatches,
        "highs": highspy.Highs().version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    raw = {o: {s: [round(t * 1000, 3) for t in v] for s, v in d.items()} for o, d in times.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results, "raw_ms": raw}, indent=2))
    print_table(results, meta, out)


def print_table(results: list[dict], meta: dict, out: Path) -> None:
    print(
        f"\n{meta['instances']} instances, {meta['layers']} layers x {meta['devices']} devices, "
        f"{meta['mismatches']} objective mismatches"
    )
    print(
        f"{'objective':10} {'solver':6} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} "
        f"{'milp/dp':>8}"
    )
    for r in results:
        ratio = r.get("median_ratio_milp_over_dp")
        print(
            f"{r['objective']:10} {r['solver']:6} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f} {'' if ratio is None else f'{ratio:.2f}':>8}"
        )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
