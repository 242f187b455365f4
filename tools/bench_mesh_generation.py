#!/usr/bin/env python3
"""Benchmark: distributed generation on a local mesh against the monolithic model, one run.

Starts an N-peer testbed (separate daemon processes, libp2p over loopback), serves SmolLM2 at
the given precision, and measures in the same run:
  * monolithic decode tokens/s (this process, one ONNX Runtime thread) and mesh decode
    tokens/s for a single request, in alternating rounds, and time to first token,
  * aggregate tokens/s with 1, 2 and 4 concurrent requests sent to different peers, the
    three levels alternating in as many rounds (medians).
Prints a table and writes JSON.

    .venv/bin/python tools/bench_mesh_generation.py [--peers 4] [--precisions fp32,int4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from meshllm.control.client import call, call_stream  # noqa: E402
from meshllm.model.chain import LocalChain  # noqa: E402
from meshllm.model.importer import import_model  # noqa: E402
from meshllm.model.store import ModelStore  # noqa: E402
from meshllm.model.tokenizer import ChatTokenizer  # noqa: E402
from tools.pipe_floor import PipeRing  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a robot who learns to paint.",
    "Write a long story about a girl who sails around the world.",
    "Write a long story about a village that wakes up without electricity.",
]


def mono_round(chain: LocalChain, ids: list[int], tokens: int) -> float:
    """Decode tokens/s of one greedy generation on the whole model (first token excluded)."""
    rid = uuid.uuid4().hex
    chain.open(rid, len(ids) + tokens)
    x, pos = np.asarray([ids], dtype=np.int64), len(ids)
    first = time.perf_counter()
    for i in range(tokens):
        tok = int(np.argmax(chain.forward(rid, x, pos)))
        if i == 0:
            first = time.perf_counter()
        x, pos = np.asarray([[tok]], dtype=np.int64), pos + 1
    chain.close(rid)
    return (tokens - 1) / (time.perf_counter() - first)


def query(home: Path, prompt: str, tokens: int) -> dict:
    return call_stream(home, "query", None, timeout=300, prompt=prompt, max_tokens=tokens)


LEVELS = (1, 2, 4)  # concurrent requests for the aggregate figures


def aggregate_round(homes: list[Path], conc: int, tokens: int, shift: int = 0) -> float:
    """Tokens/s of *conc* concurrent requests, each sent to a different peer (from *shift*
    on, so that the rounds take turns at coordinating)."""
    n = len(homes)
    jobs = [(homes[(shift + i) % n], PROMPTS[i % len(PROMPTS)]) for i in range(conc)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=conc) as pool:
        res = list(pool.map(lambda j: query(j[0], j[1], tokens), jobs))
    wall = time.perf_counter() - t0
    return sum(len(r["token_ids"]) for r in res) / wall


def bench_precision(
    store: ModelStore,
    precision: str,
    n: int,
    tokens: int,
    rounds: int,
    partitioner: str,
    floor: bool = False,
    source: str | None = None,
    max_batch: int | None = None,
) -> dict:
    manifest, _ = import_model(
        store.dir, source, precision=precision, report=lambda m: print(m, file=sys.stderr)
    )
    name = manifest.name
    model = store.get(name)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = {"limits": {"max_batch": str(max_batch)}} if max_batch is not None else None
        peers = testbed.up(root, n, config=config)
        homes = [Path(p.home) for p in peers]
        try:
            dest = homes[0] / "models" / name
            shutil.copytree(
                model.path,
                dest,
                copy_function=os.link,
                ignore=shutil.ignore_patterns("segments", "*.lock"),
            )
            call(homes[1], "serve", timeout=600, model=name, partitioner=partitioner, wait_s=590)
            deadline = time.monotonic() + 300
            while not call(homes[1], "status")["serving"]["ready"]:
                if time.monotonic() > deadline:
                    raise SystemExit("mesh not ready in 300 s")
                time.sleep(0.2)
            query(homes[0], "Hello", 8)  # warm-up: first-run allocations on every stage
            chain = LocalChain.load(model, None, threads=1)
            ids = ChatTokenizer(model.path).encode_prompt(PROMPTS[0])
            mono_round(chain, ids, 8)  # its warm-up
            # Monolithic and mesh rounds alternate, so a shared machine's drift (another
            # tenant's load coming and going) falls on both sides of the ratio alike.
            plan = call(homes[0], "status")["serving"]["plan"]
            ring = (
                PipeRing(store.dir, name, [(a, b) for _, a, b in plan["stages"]]) if floor else None
            )
            if ring is not None:
                ring.round(ids, 8)
            monos, singles, floors = [], [], []
            try:
                for i in range(rounds):
                    monos.append(mono_round(chain, ids, tokens))
                    singles.append(query(homes[i % n], PROMPTS[0], tokens))
                    if ring is not None:
                        floors.append(ring.round(ids, tokens))
            finally:
                if ring is not None:
                    ring.close()
            # One batch per level was as noisy as the machine: x@4 from 1.45 to 2.12 across
            # runs of the same build. The levels alternate within each round instead, and
            # the ratios are taken of the medians, as for the single request above.
            agg_rounds: dict[int, list[float]] = {c: [] for c in LEVELS}
            for r in range(rounds):
                for conc in LEVELS:
                    agg_rounds[conc].append(aggregate_round(homes, conc, tokens, shift=r))
            plan_stages = [f"{a}-{b}" for _, a, b in plan["stages"]]
            memory = []
            for p, home in zip(peers, homes, strict=True):
                status = Path(f"/proc/{p.pid}/status").read_text().splitlines()
                rss = int(next(x.split()[1] for x in status if x.startswith("VmRSS:"))) / 1024
                view = call(home, "status")
                me = view["self"]["id"]
                own = view["serving"]["states"].get(me, {})
                stats = (view["serving"].get("runtime", {}).get(me) or {}).get("stage_stats", {})
                memory.append(
                    {
                        "peer": p.index,
                        "layers": own.get("layers"),
                        "rss_mib": round(rss, 1),
                        "segment_mib": round(own.get("segment_bytes", 0) / 2**20, 1),
                        # Decode steps this stage ran in batches with other requests' steps.
                        "batches": stats.get("batches", 0),
                        "batched_steps": stats.get("batched_steps", 0),
                    }
                )
        finally:
            testbed.down(root)
    mono = statistics.median(monos)
    aggregate = {c: statistics.median(v) for c, v in agg_rounds.items()}
    mesh_rates = [r["decode_tokens_per_s"] for r in singles]
    single = statistics.median(mesh_rates)
    return {
        "model": name,
        "precision": precision,
        "peers": n,
        "partitioner": partitioner,
        "max_batch": max_batch,
        "stages": [str(s) for s in plan_stages],
        "tokens": tokens,
        "monolithic_decode_tok_s": round(mono, 2),
        "monolithic_rounds_tok_s": [round(x, 2) for x in monos],
        "mesh_single_decode_tok_s": round(single, 2),
        "mesh_single_rounds_tok_s": [round(x, 2) for x in mesh_rates],
        "mesh_single_ratio": round(single / mono, 3),
        # Each mesh round against the monolithic round just before it: the spread shows how
        # much of the ratio is the machine's noise.
        "mesh_single_ratio_pairs": [
            round(b / a, 3) for a, b in zip(monos, mesh_rates, strict=True)
        ],
        # The same segments as separate processes joined by pipes (tools/pipe_floor.py): what
        # the process split alone costs here, and the mesh against that.
        "floor_decode_tok_s": round(statistics.median(floors), 2) if floors else None,
        "floor_ratio": round(statistics.median(floors) / mono, 3) if floors else None,
        "mesh_vs_floor": round(single / statistics.median(floors), 3) if floors else None,
        "mesh_ttft_s": round(statistics.median(r["ttft_s"] for r in singles), 4),
        "aggregate_tok_s": {str(k): round(v, 2) for k, v in aggregate.items()},
        "aggregate_rounds_tok_s": {str(k): [round(x, 2) for x in v] for k, v in agg_rounds.items()},
        "aggregate_ratio_vs_1": {str(k): round(v / aggregate[1], 3) for k, v in aggregate.items()},
        "stage_breakdown_s": singles[0]["stages"],
        "daemon_rss_mib": [m["rss_mib"] for m in memory],
        # Each daemon's resident memory beside the size of the segment it runs.
        "peer_memory": memory,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds of monolithic and single-request mesh decoding, and of the "
        "1, 2 and 4 concurrent-request batches (each figure is a median over them)",
    )
    ap.add_argument(
        "--partitioner",
        default="even",
        help="even: one stage per peer (the pipeline this measures); lp: the planner's choice",
    )
    ap.add_argument(
        "--home", default=os.environ.get("MESHLLM_HOME", REPO / ".cache" / "bench-home")
    )
    ap.add_argument(
        "--source",
        default=None,
        help="model to benchmark: a GGUF file or a Hugging Face directory, imported once per "
        "precision (default: the bundled SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also time the plan's segments as plain processes joined by pipes, in the same "
        "alternating rounds: what splitting into processes costs on this machine by itself",
    )
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="[limits] max_batch of every peer (default: the daemon's; 1 turns off running "
        "several requests' decode steps as one batch)",
    )
    ap.add_argument("--out", default=REPO / "bench-results" / "mesh_generation.json")
    args = ap.parse_args()
    testbed.exit_on_sigterm()  # stopped by `timeout`, it still takes its testbed down
    store = ModelStore(Path(args.home) / "models")
    results = [
        bench_precision(
            store,
            p,
            args.peers,
            args.tokens,
            args.rounds,
            args.partitioner,
            args.floor,
            args.source,
            args.max_batch,
        )
        for p in args.precisions.split(",")
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "mesh_generation", "results": results}, indent=2))
    print(
        f"\n{'prec':5} {'plan':6} {'peers':>5} {'mono tok/s':>10} {'mesh tok/s':>10} "
        f"{'ratio':>6} {'pairs':>10} {'floor':>6} {'ttft ms':>8} "
        f"{'agg@1':>7} {'agg@2':>7} {'agg@4':>7} {'x@4':>5}"
    )
    for r in results:
        a = r["aggregate_tok_s"]
        pairs = r["mesh_single_ratio_pairs"]
        print(
            f"{r['precision']:5} {r['partitioner']:6} {r['peers']:>5} "
            f"{r['monolithic_decode_tok_s']:>10.1f} {r['mesh_single_decode_tok_s']:>10.1f} "
            f"{r['mesh_single_ratio']:>6.2f} {f'{min(pairs):.2f}-{max(pairs):.2f}':>10} "
            f"{'-' if r['floor_ratio'] is None else format(r['floor_ratio'], '.2f'):>6} "
            f"{r['mesh_ttft_s'] * 1000:>8.0f} {a['1']:>7.1f} {a['2']:>7.1f} {a['4']:>7.1f} "
            f"{r['aggregate_ratio_vs_1']['4']:>5.2f}"
        )
    for r in results:
        print(
            f"\n{r['precision']}: {'peer':>4} {'layers':>7} {'segment MiB':>11} {'RSS MiB':>8} "
            f"{'batched steps':>13} {'rows/batch':>10}"
        )
        for m in r["peer_memory"]:
            layers, seg, rss = m["layers"] or "-", m["segment_mib"], m["rss_mib"]
            pad = " " * (len(r["precision"]) + 1)
            rows = m["batched_steps"] / m["batches"] if m["batches"] else 0.0
            print(
                f"{pad} {m['peer']:>4} {layers:>7} {seg:>11.1f} {rss:>8.1f} "
                f"{m['batched_steps']:>13} {rows:>10.2f}"
            )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
