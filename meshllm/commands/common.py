"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from meshllm.home import models_dir, peer_home
from meshllm.model.store import ModelStore


def store_from(ctx: click.Context) -> ModelStore:
    return ModelStore(models_dir(peer_home(ctx.obj.get("home"))))


def progress(msg: str) -> None:
    click.echo(msg, err=True)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
