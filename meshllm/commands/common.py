"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from meshllm.home import models_dir, peer_home

if TYPE_CHECKING:
    from meshllm.model.store import ModelStore


def store_from(ctx: click.Context) -> ModelStore:
    from meshllm.model.store import ModelStore

    return ModelStore(models_dir(peer_home(ctx.obj.get("home"))))


def progress(msg: str) -> None:
    click.echo(msg, err=True)


def bar(fraction: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * fraction:3.0f}%"


class ProgressLine:
    """One line of progress on stderr: redrawn in place on a terminal, and printed only when
    it changes otherwise (so logs and CI output stay readable)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = ""

    def show(self, line: str) -> None:
        if line == self._last:
            return
        if self._tty:
            pad = " " * max(0, len(self._last) - len(line))
            sys.stderr.write(f"\r{line}{pad}")
            sys.stderr.flush()
        else:
            click.echo(line, err=True)
        self._last = line

    def done(self) -> None:
        if self._tty and self._last:
            sys.stderr.write("\n")
        self._last = ""


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def generation_options(f):  # type: ignore[no-untyped-def]
    """--max-tokens, --temperature, --top-k, --top-p, --seed and --raw, shared by the commands
    that generate text (locally or on the mesh)."""
    options = [
        click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="0 is greedy decoding.",
        ),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="0 disables top-k."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0),
        click.option("--seed", type=int, help="Seed for sampling (temperature > 0)."),
        click.option(
            "--raw", is_flag=True, help="Send the prompt as is, without the chat template."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
