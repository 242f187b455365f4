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


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
