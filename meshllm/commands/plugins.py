"""``meshllm plugins``: what extends this installation."""

from __future__ import annotations

import click

from meshllm.commands.common import print_json


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins_cmd(as_json: bool) -> None:
    """List loaded plugins and the partitioners, transports and balancing policies they add.

    Plugins are the built-ins plus every package exposing the ``meshllm`` entry-point group;
    see docs/plugins.md for the hooks and how to write one.
    """
    from meshllm.plugins import describe_plugins, get_plugin_manager

    info = describe_plugins(get_plugin_manager())
    if as_json:
        print_json(info)
        return
    click.echo("PLUGIN                          KIND         HOOKS")
    for p in info["plugins"]:  # type: ignore[union-attr]
        click.echo(f"{p['name']:31} {p['kind']:12} {', '.join(p['hooks']) or '-'}")
    for key, title in (
        ("partitioners", "partitioners"),
        ("transports", "transports"),
        ("balancing_policies", "balancing policies"),
    ):
        items = info[key]  # type: ignore[index]
        click.echo(f"\n{title}: " + ", ".join(f"{n} ({o})" for n, o in items.items()))
