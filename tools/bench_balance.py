#!/usr/bin/env python3
"""Benchmark: the runtime load balancer on emulated phones (needs root), one run.

Starts a phone testbed of 4 equal peers (1 core, 400 Mbit/s, 2 GiB each; every peer in its own
network namespace and cgroup), imports SmolLM2 on the first phone and, in each of --rounds
rounds, for each balance policy (``none``, then ``threshold``), serves it with the ``even``
partitioner and runs one long greedy query from peer 0. After --event-at tokens the peer
running the plan's second stage is throttled to 0.25 core (``testbed.throttle``, as
`meshllm testbed throttle` does), the way a phone slows down when it heats up or another app
wakes. Per policy it measures:
  * tokens/s before the event (token 8 to the event), after it (event to the end) and in the
    last half after it,
  * how many tokens the query took after the event until a new plan was live (from the
    query's recoveries; see until_new_plan below),
  * the plan changes the query survived, and the balancer's status at the end,
and checks that every run produced the same token ids (greedy: balancing must not change the
answer). The headline is the median over the rounds of threshold's after-event rate over
none's (each round's ratio is printed too). Prints a table, writes JSON, and plots tokens/s
over time for both policies of the first round.

    sudo .venv/bin/python tools/bench_balance.py [--tokens 512] [--event-at 48] [--precision P]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshllm import testbed  # noqa: E402
from meshllm.control.client import RequestFailed, call, call_stream  # noqa: E402
from meshllm.model.importer import import_model  # noqa: E402
from meshllm.model.store import ModelStore  # noqa: E402

# Four equal phones: whatever the balancer does comes from the throttle, not from the profile.
PROFILE = (
    """
[class.phone]
cpu = 1.0
bandwidth_mbit = 400
memory_mb = 2048
"""
    + '\n[[peer]]\nclass = "phone"\n' * 4
)
POLICIES = ["none", "threshold"]
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
THROTTLED_CPU = 0.25
SKIP = 8  # the first tokens carry prefill and first-step allocations: not steady-state decode
WINDOW = 8  # tokens per point of the rolling rate in the chart


@dataclass
class Run:
    """One policy's query: per-token times (seconds since the query was sent) and results."""

    policy: str
    balance_sent: bool  # False: the daemon rejected `balance`, served without it
    serve_epoch: int
    stages: list[list[Any]]
    throttled: int  # testbed index of the peer throttled at the event
    times: list[float] = field(default_factory=list)
    event_token: int | None = None  # tokens received when the throttle was started
    event_s: float | None = None
    throttle_s: float | None = None  # when the quota was written (seconds since query start)
    throttle_error: str | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    balancer: Any = None


def serve(home: Path, model: str, policy: str) -> tuple[dict, bool]:
    """Serve *model* with the even split and *policy*; (plan once ready, balance was sent).

    Until the balancer lands a daemon may reject the ``balance`` argument: then serve without
    it (and say so), so this script still runs end to end."""
    args: dict[str, Any] = {"model": model, "partitioner": "even", "wait_s": 600}
    try:
        plan = call(home, "serve", timeout=620, balance=policy, **args)["plan"]
        sent = True
    except RequestFailed as exc:
        if "balance" not in str(exc):
            raise
        print(f"  serve rejected balance={policy!r} ({exc}): serving without it", flush=True)
        plan = call(home, "serve", timeout=620, **args)["plan"]
        sent = False
    deadline = time.monotonic() + 600
    while True:
        st = call(home, "status")["serving"]
        if st["ready"] and st["plan"]["epoch"] == plan["epoch"]:
            return st["plan"], sent
        if time.monotonic() > deadline:
            raise SystemExit(f"policy {policy}: plan not ready in 600 s")
        time.sleep(0.3)


def run_policy(
    root: Path, homes: list[Path], ids: dict[str, int], model: str, policy: str, args: Any
) -> Run:
    plan, sent = serve(homes[0], model, policy)
    for i in range(len(homes)):
        testbed.throttle(root, i, None)  # every run starts from unthrottled phones
    stages = plan["stages"]
    if len(stages) < 2:
        raise SystemExit(f"the plan has {len(stages)} stage(s): no middle stage to throttle")
    # A middle stage on a phone that is neither the model's source nor the query's
    # coordinator (both peer 0): throttling those would also slow down moving the layers.
    middle = [ids[p] for p, _a, _b in stages[1:-1] if ids[p] != 0]
    if not middle:
        raise SystemExit(f"no middle stage away from peer 0 to throttle: {stages}")
    run = Run(policy, sent, plan["epoch"], stages, middle[0])
    print(f"  plan epoch {plan['epoch']}: {stages}; will throttle peer-{run.throttled}", flush=True)
    # Warm-up: first-run allocations on every stage would otherwise sit in the "before" rate.
    call_stream(homes[0], "query", None, timeout=900, prompt="Hello", max_tokens=8)

    def throttle() -> None:
        try:
            testbed.throttle(root, run.throttled, THROTTLED_CPU)
            run.throttle_s = time.perf_counter() - t0
        except Exception as exc:  # reported with the results, never lost in the thread
            run.throttle_error = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=throttle, name="throttle", daemon=True)

    def on_event(event: dict[str, Any]) -> None:
        if "token" not in event:
            return
        run.times.append(time.perf_counter() - t0)
        if len(run.times) == args.event_at:
            # The quota is written from another thread: this callback reads the token stream,
            # and stalling it would show up as a gap in the very rates being measured.
            run.event_token, run.event_s = len(run.times), run.times[-1]
            worker.start()

    t0 = time.perf_counter()
    run.answer = call_stream(
        homes[0], "query", on_event, timeout=900, prompt=PROMPT, max_tokens=args.tokens
    )
    if worker.is_alive() or run.event_token is not None:
        worker.join(timeout=30)
    run.balancer = (call(homes[0], "status").get("serving") or {}).get("balancer")
    return run


def rate(times: list[float], a: int, b: int) -> float | None:
    """Tokens/s from token index *a* to *b* (the tokens after a, up to and including b)."""
    if b <= a or b >= len(times) or times[b] <= times[a]:
        return None
    return (b - a) / (times[b] - times[a])


def metrics(run: Run) -> dict[str, Any]:
    t, n = run.times, len(run.times)
    out: dict[str, Any] = {"tokens": n, "recoveries": len(run.answer.get("recoveries") or [])}
    if run.event_token is None:
        after = ("after_tok_s", "after_last_half_tok_s", "until_new_plan", "largest_gap")
        return {**out, "before_tok_s": rate(t, SKIP, n - 1), **dict.fromkeys(after)}
    e = run.event_token - 1  # index of the token at which the throttle was started
    out["before_tok_s"] = rate(t, SKIP, e)
    out["after_tok_s"] = rate(t, e, n - 1)
    out["after_last_half_tok_s"] = rate(t, e + (n - 1 - e) // 2, n - 1)
    # until_new_plan: tokens the query produced after the event until a plan of a new epoch
    # took over, i.e. the first such recovery's tokens_done minus the event token count (the
    # new plan produces token tokens_done + 1 onwards). Taken from the query's own record, not
    # from timing, so it does not depend on how the pause looks. None: the plan never changed.
    new = [r for r in run.answer.get("recoveries") or [] if r.get("epoch", 0) > run.serve_epoch]
    out["until_new_plan"] = new[0]["tokens_done"] - run.event_token if new else None
    # For comparison, the timing view: the largest pause between two tokens after the event
    # (where a re-plan would show) and how many tokens after the event it came.
    gaps = [(t[i] - t[i - 1], i) for i in range(e + 1, n)]
    if gaps:
        gap, i = max(gaps)
        out["largest_gap"] = {"s": round(gap, 3), "tokens_after_event": i - e}
    else:
        out["largest_gap"] = None
    return out


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a testbed host
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[dev]): no chart", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, colour in zip(runs, ("tab:grey", "tab:blue"), strict=False):
        t = run.times
        xs = [t[i] for i in range(WINDOW, len(t))]
        ys = [WINDOW / (t[i] - t[i - WINDOW]) for i in range(WINDOW, len(t))]
        label = run.policy if run.balance_sent else f"{run.policy} (balance not accepted)"
        # Steps, each value held over the window it was measured on: a straight line from one
        # point to the next would draw a pause (a re-plan) as a slow decline instead.
        ax.plot(xs, ys, color=colour, label=label, drawstyle="steps-pre")
        if run.event_s is not None:
            what = f"peer-{run.throttled} -> {THROTTLED_CPU:g} cpu ({run.policy})"
            ax.axvline(run.event_s, color=colour, linestyle="--", linewidth=1, label=what)
        for r in run.answer.get("recoveries") or []:
            i = r.get("tokens_done", 0)
            if 0 < i < len(t):
                # The first token of the new plan, after the pause the re-plan took.
                ax.plot(
                    [t[i]],
                    [0],
                    marker="^",
                    color=colour,
                    clip_on=False,
                    linestyle="none",
                    label=f"new plan, epoch {r.get('epoch')} ({run.policy}; "
                    f"{r.get('wait_s', 0):.1f} s wait)",
                )
    ax.set_xlabel("seconds since the query started")
    ax.set_ylabel(f"tokens/s (rolling, {WINDOW} tokens)")
    ax.set_title("Runtime load balancing: 4 equal phones, one throttled mid-query")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def runs_from_json(path: Path) -> list[Run]:
    """The runs a previous benchmark wrote, enough to draw its chart again."""
    data = json.loads(path.read_text())
    return [
        Run(
            policy=r["policy"],
            balance_sent=r["balance_sent"],
            serve_epoch=r["serve_epoch"],
            stages=r["stages"],
            throttled=r["throttled_peer"],
            times=r["token_times_s"],
            event_token=r["event_token"],
            event_s=r["event_s"],
            answer={"recoveries": r["recoveries"] or []},
        )
        for r in data["runs"]
    ]


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--precision", default="int4", choices=["int4", "fp32"])
    ap.add_argument("--event-at", type=int, default=48, help="Throttle after this many tokens.")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="pairs of runs (none, then threshold) in one testbed; the headline is the median "
        "of the pairs' ratios, since one pair on a shared machine is noisy",
    )
    ap.add_argument(
        "--home", default=os.environ.get("MESHLLM_HOME", REPO / ".cache" / "bench-home")
    )
    ap.add_argument("--out", default=REPO / "bench-results" / "balance.json")
    ap.add_argument("--chart", default=REPO / "docs" / "balance-bench.png")
    ap.add_argument(
        "--plot-only", action="store_true", help="Only redraw the chart from --out's JSON."
    )
    args = ap.parse_args()
    testbed.exit_on_sigterm()  # stopped by `timeout`, it still takes its testbed down
    if args.plot_only:
        if plot(runs_from_json(Path(args.out)), Path(args.chart)):
            print(f"chart written to {args.chart}")
        return
    if os.geteuid() != 0:
        raise SystemExit("this benchmark puts peers in network namespaces and cgroups: run as root")
    if not SKIP < args.event_at < args.tokens:
        raise SystemExit(f"--event-at must be between {SKIP + 1} and --tokens - 1")
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
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tb"
        profile = Path(tmp) / "equal-phones.toml"
        profile.write_text(PROFILE)
        try:
            peers = testbed.up(root, profile=profile, report=print)
            homes = [Path(p.home) for p in peers]
            ids = {call(h, "status")["self"]["id"]: i for i, h in enumerate(homes)}
            shutil.copytree(
                model.path,
                homes[0] / "models" / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns("segments", "*.lock"),
            )
            time.sleep(3)  # the daemon notices the import and advertises it on heartbeats
            for k in range(args.rounds):
                for policy in POLICIES:
                    print(f"round {k + 1}, policy {policy}:", flush=True)
                    run = run_policy(root, homes, ids, name, policy, args)
                    runs.append(run)
                    m = metrics(run)
                    print(f"  {json.dumps(m)}", flush=True)
        finally:
            testbed.down(root)
    rows = [
        {"policy": r.policy, "round": i // len(POLICIES) + 1, **metrics(r)}
        for i, r in enumerate(runs)
    ]
    for r in rows:
        before, after = r["before_tok_s"], r["after_tok_s"]
        r["after_vs_before"] = after / before if before and after else None
    ratios: list[float | None] = []
    for k in range(args.rounds):
        by = {r["policy"]: r for r in rows if r["round"] == k + 1}
        none_after, thr_after = by["none"]["after_tok_s"], by["threshold"]["after_tok_s"]
        ratios.append(thr_after / none_after if none_after and thr_after else None)
    measured = sorted(x for x in ratios if x is not None)
    headline = statistics.median(measured) if len(measured) == len(ratios) else None
    same = len({str(r.answer.get("token_ids")) for r in runs}) == 1
    result = {
        "benchmark": "balance",
        "profile": PROFILE,
        "tokens": args.tokens,
        "event_at": args.event_at,
        "throttled_cpu": THROTTLED_CPU,
        "rounds": args.rounds,
        "round_ratios": ratios,
        "headline_after_threshold_vs_none": headline,
        "identical_token_ids": same,
        "runs": [
            {
                "policy": r.policy,
                "balance_sent": r.balance_sent,
                "serve_epoch": r.serve_epoch,
                "stages": r.stages,
                "throttled_peer": r.throttled,
                "event_token": r.event_token,
                "event_s": r.event_s,
                "throttle_s": r.throttle_s,
                "throttle_error": r.throttle_error,
                "metrics": row,
                "token_ids": r.answer.get("token_ids"),
                "recoveries": r.answer.get("recoveries"),
                "plan_epoch": r.answer.get("plan_epoch"),
                "balancer": r.balancer,
                "token_times_s": [round(x, 4) for x in r.times],
            }
            for r, row in zip(runs, rows, strict=True)
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    charted = plot(runs[: len(POLICIES)], Path(args.chart))  # the first round's pair

    print(
        f"\n{'round':5} {'policy':10} {'tok/s before':>12} {'tok/s after':>11} "
        f"{'after/before':>12} {'last half':>9} {'until new plan':>14} {'recoveries':>10}"
    )
    for r, run in zip(rows, runs, strict=True):
        note = "" if run.balance_sent else "  (daemon rejected balance=: served without it)"
        until = "-" if r["until_new_plan"] is None else f"{r['until_new_plan']} tok"
        print(
            f"{r['round']:<5} {r['policy']:10} {fmt(r['before_tok_s']):>12} "
            f"{fmt(r['after_tok_s']):>11} {fmt(r['after_vs_before'], '.2f'):>12} "
            f"{fmt(r['after_last_half_tok_s']):>9} {until:>14} {r['recoveries']:>10}{note}"
        )
        if run.throttle_error:
            print(f"  throttle failed: {run.throttle_error}")
        for rec in run.answer.get("recoveries") or []:
            print(f"  recovery: {rec}")
        print(f"  balancer status: {json.dumps(run.balancer)}")
    shown = ", ".join(fmt(x, ".2f") for x in ratios)
    print(f"\nafter-event tok/s, threshold / none, per round: {shown}")
    print(f"headline (median of the rounds): {fmt(headline, '.2f')} (target >= 1.3)")
    print(f"identical greedy token ids in every run: {same}")
    print(
        "until new plan = the first recovery to a new epoch's tokens_done minus the tokens "
        "received at the event"
    )
    if charted:
        print(f"chart written to {args.chart}")
    print(f"written to {out}")
    if not same:
        raise SystemExit("the balancer changed the greedy answer")


if __name__ == "__main__":
    main()
