"""``meshllm serve`` and ``meshllm query``: the mesh as a whole answering prompts."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from meshllm.commands.common import generation_options, print_json, progress
from meshllm.commands.peer import home_of, home_option
from meshllm.control.client import call, call_stream
from meshllm.errors import MeshError


def _describe(plan: dict[str, Any]) -> str:
    stages = ", ".join(f"{p[:10]}…:{a}-{b}" for p, a, b in plan["stages"])
    return (
        f"plan epoch {plan['epoch']}: {plan['model']} over {len(plan['stages'])} peers ({stages})"
    )


@click.command("serve")
@home_option
@click.argument("model")
@click.option("--partitioner", default="even", show_default=True, help="Partitioner plugin.")
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
    ctx: click.Context, model: str, partitioner: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """Serve MODEL (imported on any peer) across the live peers of the mesh."""
    home = home_of(ctx)
    result = call(home, "serve", model=model, partitioner=partitioner)
    plan = result["plan"]
    progress(_describe(plan))
    st: dict[str, Any] = {}
    if wait:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            st = call(home, "status")["serving"]
            if st["plan"] and st["plan"]["epoch"] > plan["epoch"]:
                raise MeshError("the plan was replaced while loading (a peer joined or left)")
            states = st["states"]
            line = "  ".join(
                f"{pid[-6:]}:{s.get('state', '?')}"
                + (f" {100 * s['progress']:.0f}%" if s.get("state") == "fetching" and
                   "progress" in s else "")
                + (f" ({s['detail']})" if s.get("state") == "error" else "")
                for pid, s in states.items()
            )  # fmt: skip
            if line != last:
                progress(line)
                last = line
            if st["ready"]:
                break
            errors = [s.get("detail") for s in states.values() if s.get("state") == "error"]
            if time.monotonic() > deadline:
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
    ctx: click.Context, prompt: str, max_tokens: int, temperature: float, top_k: int,
    top_p: float, seed: int | None, raw: bool, as_json: bool,
) -> None:  # fmt: skip
    """Ask the mesh: this peer coordinates, every stage runs its own layers."""

    def show(ev: dict[str, Any]) -> None:
        if not as_json and ev.get("text"):
            sys.stdout.write(ev["text"])
            sys.stdout.flush()

    result = call_stream(
        home_of(ctx), "query", show, timeout=120, prompt=prompt, max_tokens=max_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, raw=raw,
    )  # fmt: skip
    if as_json:
        print_json(result)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    progress(
        f"[{len(result['token_ids'])} tokens, ttft {result['ttft_s'] * 1000:.0f} ms, "
        f"{result['decode_tokens_per_s']:.1f} tok/s, {len(result['stages']) - 1} stages]"
    )
