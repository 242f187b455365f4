"""``meshllm testbed``: many local daemons for trying things out and for tests."""

from __future__ import annotations

from pathlib import Path

import click

from meshllm import testbed
from meshllm.commands.common import print_json, progress

DEFAULT_DIR = Path(".meshllm-testbed")
dir_option = click.option(
    "--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DIR,
    show_default=True, help="Directory holding the peers' homes and the testbed state.",
)  # fmt: skip


@click.group("testbed")
def testbed_group() -> None:
    """Start, inspect and stop a local testbed of peers on 127.0.0.1."""


@testbed_group.command("up")
@click.option("--peers", "n", type=click.IntRange(min=1, max=64), default=3, show_default=True)
@dir_option
def up_cmd(n: int, root: Path) -> None:
    """Start N daemons as separate processes, each joining through the previous one."""
    peers = testbed.up(root, n, report=progress)
    click.echo(f"{len(peers)} peers up in {root}")


@testbed_group.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status_cmd(root: Path, as_json: bool) -> None:
    """Show every testbed peer's view: role, term, leader, members."""
    entries = testbed.status(root)
    if as_json:
        print_json(entries)
        return
    click.echo(f"{'PEER':7} {'PID':>7} {'ROLE':9} {'TERM':>4} {'MEMBERS':>7}  LEADER")
    for e in entries:
        st = e.get("status")
        if st is None:
            click.echo(f"peer-{e['index']:<2} {e['pid']:>7} down      {e['error']}")
            continue
        click.echo(
            f"peer-{e['index']:<2} {e['pid']:>7} {st['self']['role']:9} {st['term']:>4} "
            f"{len(st['members']):>7}  {st['leader'] or '-'}"
        )


@testbed_group.command("down")
@dir_option
def down_cmd(root: Path) -> None:
    """Stop every daemon the testbed started (SIGTERM, then SIGKILL after 5 s)."""
    n = testbed.down(root)
    click.echo(f"stopped {n} daemon(s)")
