#!/usr/bin/env python3
"""Benchmark: decode speed of segment chains against the monolithic model, in one run.

For each precision, runs the monolithic model and 2-, 3- and 5-segment chains (even splits)
round-robin, several rounds, greedy decoding a fixed number of tokens without stopping at EOS.
Reports the median decode tokens/s of each and its ratio to the monolithic median of the same
run. Prints a table and writes JSON.

    .venv/bin/python tools/bench_chain.py [--precisions int4,fp32] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm.model.chain import LocalChain  # noqa: E402
from meshllm.model.importer import import_model  # noqa: E402
from meshllm.model.ranges import even_ranges  # noqa: E402
from meshllm.model.store import ModelStore  # noqa: E402
from meshllm.model.tokenizer import ChatTokenizer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(chain: LocalChain, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """(decode tokens/s, time to first token s) for one greedy generation of *tokens*."""
    rid = uuid.uuid4().hex
    chain.open(rid, len(prompt_ids) + tokens)
    try:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        total = len(prompt_ids)
        t0 = time.perf_counter()
        first = t0
        for i in range(tokens):
            tok = int(np.argmax(chain.forward(rid, ids, total)))
            if i == 0:
                first = time.perf_counter()
            ids = np.asarray([[tok]], dtype=np.int64)
            total += 1
        end = time.perf_counter()
    finally:
        chain.close(rid)
    return (tokens - 1) / (end - first), first - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precisions", default="int4,fp32")
    ap.add_argument("--segments", default="2,3,5")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads",
        default="1,2",
        help="ONNX Runtime threads; a list runs one child process per value",
    )
    ap.add_argument(
        "--home", default=os.environ.get("MESHLLM_HOME", REPO / ".cache" / "bench-home")
    )
    ap.add_argument("--out", default=REPO / "bench-results" / "chain.json")
    args = ap.parse_args()
    threads = [int(t) for t in str(args.threads).split(",")]
    if len(threads) > 1:
        return run_children(args, threads)
    args.threads = threads[0]

    store = ModelStore(Path(args.home) / "models")
    configs = [("monolithic", None)] + [
        (f"{k} segments", k) for k in map(int, args.segments.split(","))
    ]
    results = []
    for precision in args.precisions.split(","):
        name = f"smollm2-135m-instruct-{precision}"
        import_model(
            store.dir,
            None,
            precision=precision,
            name=name,
            report=lambda m: print(m, file=sys.stderr),
        )
        model = store.get(name)
        n_layers = model.manifest.architecture.num_layers
        prompt_ids = ChatTokenizer(model.path).encode_prompt(PROMPT)
        chains = {
            label: LocalChain.load(
                model, None if k is None else even_ranges(n_layers, k), threads=args.threads
            )
            for label, k in configs
        }
        for chain in chains.values():  # warm-up: first runs allocate and page weights in
            decode_rate(chain, prompt_ids, 8)
        rates: dict[str, list[float]] = {label: [] for label in chains}
        ttfts: dict[str, list[float]] = {label: [] for label in chains}
        for _ in range(args.rounds):  # round-robin so machine noise hits every config alike
            for label, chain in chains.items():
                r, t = decode_rate(chain, prompt_ids, args.tokens)
                rates[label].append(r)
                ttfts[label].append(t)
        base = statistics.median(rates["monolithic"])
        for label, chain in chains.items():
            med = statistics.median(rates[label])
            results.append(
                {
                    "precision": precision,
                    "threads": args.threads,
                    "config": label,
                    "segments": [str(r) for r in chain.ranges],
                    "decode_tokens_per_s": round(med, 2),
                    "decode_tokens_per_s_all": [round(x, 2) for x in rates[label]],
                    "ttft_s": round(statistics.median(ttfts[label]), 4),
                    "ratio_vs_monolithic": round(med / base, 3),
                }
            )
        del chains

    meta = {
        "benchmark": "chain",
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "prompt_tokens": len(prompt_ids),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=2))
    print_table(results, out)


def print_table(results: list[dict], out: Path) -> None:
    print(
        f"\n{'precision':9} {'threads':>7} {'config':12} {'decode tok/s':>12} {'ratio':>7} "
        f"{'ttft ms':>8}"
    )
    for r in results:
        print(
            f"{r['precision']:9} {r['threads']:>7} {r['config']:12} "
            f"{r['decode_tokens_per_s']:>12.1f} {r['ratio_vs_monolithic']:>7.3f} "
            f"{r['ttft_s'] * 1000:>8.1f}"
        )
    print(f"\nwritten to {out}")


def run_children(args: argparse.Namespace, threads: list[int]) -> None:
    """One process per thread count: ONNX Runtime's shared pool is sized once per process."""
    import subprocess
    import tempfile

    merged: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            part = Path(tmp) / f"{t}.json"
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(t),
                "--out",
                str(part),
                "--precisions",
                args.precisions,
                "--segments",
                args.segments,
                "--tokens",
                str(args.tokens),
                "--rounds",
                str(args.rounds),
                "--home",
                str(args.home),
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            data = json.loads(part.read_text())
            if not merged:
                merged = {**data, "threads": threads, "results": []}
            merged["results"].extend(data["results"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2))
    print_table(merged["results"], out)


if __name__ == "__main__":
    main()
