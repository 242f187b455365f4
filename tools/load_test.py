#!/usr/bin/env python3
"""Load test: many concurrent queries on a loopback mesh, bounded in size and in time.

Starts an N-peer testbed (or uses the running one in --dir), serves SmolLM2 at the given
precision (even split), warms every peer up with one query, records each daemon's RSS, then
sends --queries queries at once, spread round-robin over the peers. Each query ends as:

  completed   the daemon streamed the answer;
  clear error the daemon answered with an error object (RequestFailed: busy, stage overloaded,
              ...): refusing work over the [limits] is the expected behaviour under overload;
  failure     anything else: no answer within the per-line timeout (a hang), the daemon closed
              the connection or vanished, or an unexpected exception.

Then it checks every daemon is still alive, lets memory settle, records RSS again, prints a
table and writes JSON. Exit status 1 if any query failed or any daemon died.

    .venv/bin/python tools/load_test.py [--queries 50] [--peers 4] [--max-tokens 32]
                                        [--precision int4] [--dir TESTBED] [--home HOME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from meshllm.control.client import RequestFailed, call, call_stream  # noqa: E402
from meshllm.errors import MeshError  # noqa: E402
from meshllm.model.importer import import_model  # noqa: E402
from meshllm.model.store import ImportedModel, ModelStore  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "Why do cats purr?",
    "Give me a word that rhymes with moon.",
]
LINE_TIMEOUT_S = 120.0  # longest silence accepted from a daemon during one query: a hang
SETTLE_S = 3.0  # after the load, before the second RSS reading (allocators return memory late)
MIB = 1 << 20


@dataclass
class Outcome:
    peer: int
    kind: str  # completed | error | failure
    seconds: float
    tokens: int = 0
    message: str = ""


def rss_mib(pid: int) -> float | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kb = next((int(x.split()[1]) for x in lines if x.startswith("VmRSS:")), None)
    return None if kb is None else round(kb / 1024, 1)


def alive(pid: int, home: Path) -> bool:
    """The process exists, is not a zombie, and answers on its control socket."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        return False
    try:
        call(home, "status", timeout=10)
    except MeshError:
        return False
    return True


def one_query(home: Path, index: int, peer: int, max_tokens: int) -> Outcome:
    t0 = time.perf_counter()
    prompt = PROMPTS[index % len(PROMPTS)]
    try:
        res = call_stream(
            home, "query", None, timeout=LINE_TIMEOUT_S, prompt=prompt, max_tokens=max_tokens
        )
    except RequestFailed as exc:
        return Outcome(peer, "error", time.perf_counter() - t0, message=f"{exc.code}: {exc}")
    except MeshError as exc:  # timeout, closed connection, no daemon: not a clear answer
        return Outcome(peer, "failure", time.perf_counter() - t0, message=str(exc))
    except Exception as exc:
        return Outcome(
            peer, "failure", time.perf_counter() - t0, message=f"{type(exc).__name__}: {exc}"
        )
    return Outcome(peer, "completed", time.perf_counter() - t0, tokens=len(res["token_ids"]))


def link_model(model: ImportedModel, home: Path) -> None:
    """Give the source peer the imported model: hard links, no copy. Already-cut segments come
    along (they are verified against the model's hash before use), so serving does not recut."""
    dest = home / "models" / model.name
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        model.path, dest, copy_function=os.link, ignore=shutil.ignore_patterns("*.lock", "*.tmp")
    )


def serve(homes: list[Path], name: str, timeout: float = 300) -> dict[str, Any]:
    """Serve *name* (even split) and wait until every peer reports the plan ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # At the source: it rescans its store now; the leader learns of the model from its
            # next heartbeat, so the first ask may find no holder yet.
            result = call(
                homes[0],
                "serve",
                timeout=timeout + 10,
                model=name,
                partitioner="even",
                wait_s=timeout,
            )
            break
        except RequestFailed as exc:
            if "imported" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.25)  # one heartbeat interval (another process: nothing to wait on)
    while not all(call(h, "status")["serving"]["ready"] for h in homes):
        if time.monotonic() > deadline:
            raise SystemExit(f"the mesh was not ready to serve {name} within {timeout:.0f} s")
        time.sleep(0.2)
    return result["plan"]


def run_load(homes: list[Path], pids: list[int], queries: int, max_tokens: int) -> dict[str, Any]:
    n = len(homes)
    for i, h in enumerate(homes):  # warm-up: first-run allocations on every coordinator
        out = one_query(h, i, i, min(max_tokens, 8))
        if out.kind != "completed":
            raise SystemExit(f"warm-up query at peer-{i} did not complete: {out.message}")
    before = [rss_mib(p) for p in pids]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=queries) as pool:
        futures = [
            pool.submit(one_query, homes[i % n], i, i % n, max_tokens) for i in range(queries)
        ]
        outcomes = [f.result() for f in futures]  # each bounded by LINE_TIMEOUT_S per line
    wall = time.perf_counter() - t0
    alive_after = [alive(p, h) for p, h in zip(pids, homes, strict=True)]
    time.sleep(SETTLE_S)
    after = [rss_mib(p) for p in pids]
    tokens = sum(o.tokens for o in outcomes)
    done = [o for o in outcomes if o.kind == "completed"]
    return {
        "queries": queries,
        "max_tokens": max_tokens,
        "completed": len(done),
        "errors": dict(Counter(o.message for o in outcomes if o.kind == "error")),
        "failures": dict(Counter(o.message for o in outcomes if o.kind == "failure")),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "slowest_completed_s": round(max((o.seconds for o in done), default=0.0), 3),
        "peers": [
            {
                "peer": i,
                "pid": pids[i],
                "alive": alive_after[i],
                "rss_before_mib": before[i],
                "rss_after_mib": after[i],
                "completed": sum(1 for o in done if o.peer == i),
                "errors": sum(1 for o in outcomes if o.peer == i and o.kind == "error"),
            }
            for i in range(n)
        ],
        "outcomes": [asdict(o) for o in outcomes],
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['model']} on {len(r['peers'])} peers, stages {' '.join(r['stages'])}")
    n_err, n_fail = sum(r["errors"].values()), sum(r["failures"].values())
    print(
        f"queries {r['queries']} x {r['max_tokens']} tokens: completed {r['completed']}, "
        f"clear errors {n_err}, failures {n_fail}"
    )
    for kind in ("errors", "failures"):
        for msg, count in sorted(r[kind].items(), key=lambda kv: -kv[1]):
            print(f"  {kind[:-1]:7} x{count:<3} {msg[:110]}")
    print(
        f"wall {r['wall_s']:.2f} s, {r['tokens']} tokens, aggregate {r['aggregate_tok_s']:.1f} "
        f"tok/s, slowest completed query {r['slowest_completed_s']:.2f} s"
    )
    print(
        f"\n{'peer':>4} {'alive':>5} {'done':>5} {'errors':>6} {'RSS before':>11} "
        f"{'RSS after':>10} {'growth':>7}"
    )
    for p in r["peers"]:
        b, a = p["rss_before_mib"] or 0.0, p["rss_after_mib"] or 0.0
        print(
            f"{p['peer']:>4} {'yes' if p['alive'] else 'NO':>5} {p['completed']:>5} "
            f"{p['errors']:>6} {b:>7.1f} MiB {a:>6.1f} MiB {a - b:>+7.1f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--precision", choices=("int4", "fp32"), default="int4")
    ap.add_argument("--dir", type=Path, help="a running testbed to use (left running)")
    ap.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("MESHLLM_HOME") or REPO / ".cache" / "bench-home"),
        help="where the model is imported (default: $MESHLLM_HOME or .cache/bench-home)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "load_test.json")
    args = ap.parse_args()
    testbed.exit_on_sigterm()  # stopped by `timeout`, it still takes its testbed down
    if args.queries < 1 or args.peers < 1 or args.max_tokens < 1:
        ap.error("--queries, --peers and --max-tokens must be >= 1")

    store = ModelStore(args.home / "models")
    name = f"smollm2-135m-instruct-{args.precision}"
    import_model(
        store.dir,
        None,
        precision=args.precision,
        name=name,
        report=lambda m: print(m, file=sys.stderr),
    )
    model = store.get(name)

    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="meshllm-load-")
        root = Path(tmp.name)
        testbed.up(root, args.peers)
    try:
        peers = testbed.load_state(root)
        homes = [Path(p.home) for p in peers]
        link_model(model, homes[0])
        t0 = time.perf_counter()
        plan = serve(homes, name)
        serve_s = time.perf_counter() - t0
        result = run_load(homes, [p.pid for p in peers], args.queries, args.max_tokens)
    finally:
        if tmp is not None:
            testbed.down(root)
            tmp.cleanup()
    result.update(
        model=name, serve_s=round(serve_s, 2), stages=[f"{a}-{b}" for _, a, b in plan["stages"]]
    )
    ok = not result["failures"] and all(p["alive"] for p in result["peers"])
    result["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "load_test", **result}, indent=2))
    print_table(result)
    print(f"\n{'OK' if ok else 'FAILED'}; written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
