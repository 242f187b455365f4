"""``meshllm serve`` and ``meshllm query``: the mesh as a whole answering prompts."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from meshllm.commands.common import (
    ProgressLine,
    bar,
    generation_options,
    print_json,
    progress,
)
from meshllm.commands.peer import home_of, home_option
from meshllm.control.client import call, call_stream
from meshllm.errors import MeshError


def _describe(plan: dict[str, Any]) -> str:
    stages = ", ".join(f"{p[:10]}…:{a}-{b}" for p, a, b in plan["stages"])
    return (
        f"plan epoch {plan['epoch']}: {plan['model']} over {len(plan['stages'])} peers ({stages})"
    )


def loading_line(status: dict[str, Any], plan: dict[str, Any]) -> str:
    """Each stage's peer by name, with a bar while it fetches its layers."""
    names = {status["self"]["id"]: status["self"]["name"]}
    names.update({p["id"]: p["name"] for p in status["peers"]})
    states = status["serving"]["states"]
    parts = []
    for pid, start, stop in plan["stages"]:
        s = states.get(pid) or {}
        what = s.get("state", "?")
        if what == "fetching" and "progress" in s:
            what = "fetching " + bar(float(s["progress"]))
        elif what == "error":
            what = f"error ({s.get('detail')})"
        parts.append(f"{names.get(pid, pid[-6:])} {start}-{stop}: {what}")
    return "  ".join(parts)


@click.command("serve")
@home_option
@click.argument("model")
@click.option(
    "--partitioner",
    default=None,
    help="Partitioner plugin: lp, even, memory or a plugin's (default: the leader's config).",
)
@click.option(
    "--objective",
    type=click.Choice(["throughput", "latency"]),
    default=None,
    help="What lp optimises: the slowest stage, or one step end to end (default: config).",
)
@click.option(
    "--balance",
    default=None,
    help="Balancing policy while serving: threshold, none or a plugin's (default: config).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every stage has its files and is loaded.",
)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def serve_cmd(
    ctx: click.Context,
    model: str,
    partitioner: str | None,
    objective: str | None,
    balance: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Serve MODEL (imported on any peer) across the live peers of the mesh.

    The leader plans with the partitioner; ``lp`` first has every peer profile itself for
    the model (a few seconds each, once per model), then solves for the best assignment.
    """
    home = home_of(ctx)
    progress(f"asking the leader to plan {model}")
    result = call(
        home,
        "serve",
        timeout=timeout + 10,
        model=model,
        partitioner=partitioner,
        objective=objective,
        balance=balance,
        wait_s=timeout,
    )
    plan = result["plan"]
    progress(_describe(plan))
    st: dict[str, Any] = {}
    if wait:
        deadline = time.monotonic() + timeout
        shown = ProgressLine()
        while True:
            full = call(home, "status")
            st = full["serving"]
            if st["plan"] and st["plan"]["epoch"] > plan["epoch"]:
                shown.done()
                raise MeshError("the plan was replaced while loading (a peer joined or left)")
            shown.show(loading_line(full, plan))
            if st["ready"]:
                shown.done()
                break
            states = st["states"]
            errors = [s.get("detail") for s in states.values() if s.get("state") == "error"]
            if time.monotonic() > deadline:
                shown.done()
                why = f" (last error: {errors[0]})" if errors else ""
                raise MeshError(f"the mesh was not ready within {timeout:.0f} s{why}")
            time.sleep(0.2)
    if as_json:
        print_json(st or result)
    else:
        click.echo(
            f"serving {plan['model']} (epoch {plan['epoch']})" + ("" if wait else ", loading")
        )


@click.command("query")
@home_option
@click.argument("prompt")
@generation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def query_cmd(
    ctx: click.Context,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    raw: bool,
    as_json: bool,
) -> None:
    """Ask the mesh: this peer coordinates, every stage runs its own layers."""

    def show(ev: dict[str, Any]) -> None:
        if not as_json and ev.get("text"):
            sys.stdout.write(ev["text"])
            sys.stdout.flush()

    result = call_stream(
        home_of(ctx),
        "query",
        show,
        timeout=120,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        raw=raw,
    )
    if as_json:
        print_json(result)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    progress(
        f"[{len(result['token_ids'])} tokens, ttft {result['ttft_s'] * 1000:.0f} ms, "
        f"{result['decode_tokens_per_s']:.1f} tok/s, {len(result['stages']) - 1} stages]"
    )


@click.command("profile")
@home_option
@click.option("--model", default=None, help="Model to profile for (default: the one served).")
@click.option("--refresh", is_flag=True, help="Measure again even where a profile exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@click.pass_context
def profile_cmd(ctx: click.Context, model: str | None, refresh: bool, as_json: bool) -> None:
    """Have every live peer measure itself for a model: layer cost, memory, links.

    Each peer times probes of the model's layers with its own ONNX Runtime (weights are
    generated, not fetched) and the round trip and bandwidth to every other peer. The leader
    plans from these figures; `meshllm status --json` shows them too.
    """
    progress("profiling every live peer, one after another")
    result = call(home_of(ctx), "profile", timeout=900, model=model, refresh=refresh)
    if as_json:
        print_json(result)
        return
    click.echo(f"profiles for {result['model']} ({result['sha'][:12]})")
    click.echo(
        f"{'PEER':14} {'LAYER ms':>8} {'FIRST ms':>8} {'LAST ms':>8} {'HOP ms':>7} "
        f"{'MEMORY MiB':>10}  LINKS (rtt ms / MiB/s)"
    )
    for peer, p in result["profiles"].items():
        if p is None:
            click.echo(f"{peer[-12:]:14} (no profile: the peer did not answer)")
            continue
        links = ", ".join(
            f"{other[-6:]}:{rtt * 1e3:.2f}/{bw / (1 << 20):.0f}"
            for other, (rtt, bw) in sorted(p["links"].items())
        )
        click.echo(
            f"…{peer[-12:]:13} {p['layer_s'] * 1e3:>8.3f} {p['first_s'] * 1e3:>8.3f} "
            f"{p['last_s'] * 1e3:>8.3f} {p['hop_s'] * 1e3:>7.3f} "
            f"{p['memory_bytes'] / (1 << 20):>10.0f}  {links}"
        )
