#!/usr/bin/env python3
"""Benchmark: emulated phones serve a model that none of them could hold (root).

Builds a shape-true synthetic model (`model synth`, seeded random weights; cached between runs),
runs it whole in one process outside any cap (the oracle and the baseline speed), then starts
a phone testbed: a laptop that runs no layers (`stages = false`) holds the files, and N phones,
each in a cgroup memory controller capped below the model's weight bytes, serve it with the
`lp` plan. A greedy answer is asked at a phone that is not the source. Reports the model's
weight bytes; per phone its cap, its segment's weight bytes, its daemon's idle and peak
resident memory and OOM kills; whether the tokens equal the whole model's; mesh decode tok/s
against the whole model's; and the plan. Prints a table and writes JSON.

    sudo .venv/bin/python tools/bench_bigger.py [--shape llama-3.2-1b] [--precision int4]
        [--phones 4] [--phone-mb 640] [--cpu 0.5] [--tokens 64] [--out bench_bigger.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from meshllm.control.client import call  # noqa: E402
from meshllm.model.segment_files import read_segment_info  # noqa: E402
from meshllm.model.store import ModelStore  # noqa: E402
from meshllm.model.synth import SHAPES, synth_model  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
MiB = 1 << 20


def cli(home: Path, *args: str, timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "meshllm", "--home", str(home), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"meshllm {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout) if "--json" in args else {}


def profile_toml(phones: int, phone_mb: int, cpu: float) -> str:
    out = [
        "[class.laptop]\ncpu = 1.0\nbandwidth_mbit = 200\nmemory_mb = 0\nstages = false\n",
        f"[class.phone]\ncpu = {cpu}\nbandwidth_mbit = 100\nmemory_mb = {phone_mb}\n",
        '[[peer]]\nclass = "laptop"\nname = "laptop"\n',
    ]
    out += [f'[[peer]]\nclass = "phone"\nname = "phone-{i}"\n' for i in range(1, phones + 1)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="int4", choices=("int4", "fp32"))
    ap.add_argument("--phones", type=int, default=4)
    ap.add_argument("--phone-mb", type=int, default=640, help="each phone's memory cap")
    ap.add_argument("--cpu", type=float, default=0.5, help="cores per phone")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench" / "home")
    ap.add_argument("--out", type=Path, default=Path("bench_bigger.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_bigger needs root (namespaces and cgroups): run it with sudo")

    store_dir = args.cache / "models"
    store_dir.mkdir(parents=True, exist_ok=True)
    name = f"{args.shape}-synth-{args.precision}"
    t0 = time.monotonic()
    print(f"building {name} (cached after the first run) ...", flush=True)
    synth_model(store_dir, args.shape, precision=args.precision, name=name)
    model = ModelStore(store_dir).get(name)
    weights = model.manifest.total_weight_bytes
    print(f"  {weights / MiB:.0f} MiB of weights, {time.monotonic() - t0:.0f} s", flush=True)
    if weights <= args.phone_mb * MiB:
        print(f"note: the model ({weights >> 20} MiB) fits in one phone's cap", flush=True)

    print("the whole model in one process, outside any cap ...", flush=True)
    mono = cli(
        args.cache,
        "generate",
        "--model",
        name,
        PROMPT,
        "--max-tokens",
        str(args.tokens),
        "--monolithic",
        "--json",
        "--threads",
        "1",
    )

    work = Path(tempfile.mkdtemp(prefix="bench-bigger-"))
    profile = work / "phones.toml"
    profile.write_text(profile_toml(args.phones, args.phone_mb, args.cpu))
    root = work / "tb"
    peers = testbed.up(root, profile=profile, report=lambda m: print("  " + m, flush=True))
    homes = [Path(p.home) for p in peers]
    try:
        laptop, phones = homes[0], homes[1:]
        idle = {h.name: call(h, "status", timeout=10)["serving"]["runtime"] for h in phones}
        dest = laptop / "models" / name
        shutil.copytree(
            model.path,
            dest,
            copy_function=os.link,
            ignore=shutil.ignore_patterns("segments", "*.lock"),
        )
        print("serving (every phone profiles itself first) ...", flush=True)
        t0 = time.monotonic()
        cli(
            phones[0],
            "serve",
            name,
            "--partitioner",
            "lp",
            "--balance",
            "none",
            "--timeout",
            "1200",
            timeout=1300,
        )
        serve_s = time.monotonic() - t0
        print(f"  ready in {serve_s:.0f} s; asking at {phones[-1].name} ...", flush=True)
        mesh = cli(phones[-1], "query", PROMPT, "--max-tokens", str(args.tokens), "--json")
        plan = call(phones[-1], "status", timeout=10)["serving"]["plan"]
        entries = {e["index"]: e for e in testbed.status(root)}
        ids = {call(h, "status", timeout=10)["self"]["id"]: i for i, h in enumerate(homes)}
        rows = []
        for peer, start, stop in plan["stages"]:
            i = ids[peer]
            info = read_segment_info(dest / "segments" / f"{start}-{stop}")
            e = entries[i]
            own = idle[homes[i].name].get(peer, {})
            rows.append(
                {
                    "phone": homes[i].name,
                    "layers": f"{start}-{stop}",
                    "cap_mib": (e["memory_limit_bytes"] or 0) // MiB,
                    "segment_mib": round(info.weight_bytes / MiB, 1) if info else None,
                    "idle_resident_mib": round(own.get("rss_mb") or 0, 1),
                    "peak_resident_mib": (e["resident_peak_bytes"] or 0) // MiB,
                    "oom_kills": e["oom_kills"],
                }
            )
        killed = sum(e["oom_kills"] or 0 for e in entries.values())
    finally:
        testbed.down(root)
        shutil.rmtree(work, ignore_errors=True)

    same = mesh["token_ids"] == mono["token_ids"]
    result = {
        "model": name,
        "weight_mib": round(weights / MiB, 1),
        "phones": args.phones,
        "phone_cap_mib": args.phone_mb,
        "phone_cpu": args.cpu,
        "tokens": args.tokens,
        "tokens_equal_monolithic": same,
        "mono_decode_tok_s": round(mono["decode_tokens_per_s"], 2),
        "mesh_decode_tok_s": round(mesh["decode_tokens_per_s"], 2),
        "mesh_over_mono": round(mesh["decode_tokens_per_s"] / mono["decode_tokens_per_s"], 3),
        "mesh_ttft_s": round(mesh["ttft_s"], 3),
        "serve_s": round(serve_s, 1),
        "oom_kills": killed,
        "plan": plan["stages"],
        "per_phone": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{name}: {result['weight_mib']} MiB of weights on {args.phones} phones capped at "
        f"{args.phone_mb} MiB ({args.cpu:g} core each), lp plan, {args.tokens} greedy tokens"
    )
    print(
        f"{'phone':10} {'layers':>7} {'cap':>6} {'segment':>8} {'idle RSS':>9} "
        f"{'peak RSS':>9} {'OOM':>4}   (MiB)"
    )
    for r in rows:
        print(
            f"{r['phone']:10} {r['layers']:>7} {r['cap_mib']:>6} {r['segment_mib']:>8} "
            f"{r['idle_resident_mib']:>9} {r['peak_resident_mib']:>9} {r['oom_kills']:>4}"
        )
    print(
        f"tokens equal to the whole model's: {same}; decode {result['mesh_decode_tok_s']} tok/s "
        f"on the mesh vs {result['mono_decode_tok_s']} whole in one process "
        f"({result['mesh_over_mono']}x); serve took {result['serve_s']} s; JSON: {args.out}"
    )
    if not same or killed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
