"""The ``meshllm`` command line. Each command group lives in ``meshllm.commands``."""

from __future__ import annotations

import sys

import click

from meshllm import __version__
from meshllm.commands.generate import generate_cmd
from meshllm.commands.model import model_group
from meshllm.commands.peer import (
    config_group,
    daemon_cmd,
    init_cmd,
    invite_cmd,
    join_cmd,
    peers_group,
    status_cmd,
    stop_cmd,
)
from meshllm.commands.plugins import plugins_cmd
from meshllm.commands.serve import profile_cmd, query_cmd, serve_cmd
from meshllm.commands.testbed import testbed_group
from meshllm.errors import MeshError
from meshllm.log import configure


@click.group()
@click.version_option(__version__, prog_name="meshllm")
@click.option(
    "--home",
    envvar="MESHLLM_HOME",
    type=click.Path(file_okay=False),
    help="Peer home directory  [env: MESHLLM_HOME; default: ~/.meshllm]",
)
@click.option(
    "--log-level",
    envvar="MESHLLM_LOG_LEVEL",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level [env: MESHLLM_LOG_LEVEL; default: warning, and the config's [log] level "
    "for the daemon]",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, log_level: str | None) -> None:
    """meshllm: run one language model across a mesh of small trusted devices."""
    configure(log_level or "warning", explicit=log_level is not None)
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


for command in (
    model_group,
    generate_cmd,
    init_cmd,
    join_cmd,
    invite_cmd,
    daemon_cmd,
    status_cmd,
    stop_cmd,
    peers_group,
    config_group,
    testbed_group,
    serve_cmd,
    query_cmd,
    profile_cmd,
    plugins_cmd,
):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except MeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
