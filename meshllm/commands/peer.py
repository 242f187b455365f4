"""Peer commands: init, join, invite, daemon, status, stop, peers, config."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

import click

from meshllm.commands.common import print_json
from meshllm.config import CONFIG_FILE, ApiSection, ConfigError, default_config_text, load_config
from meshllm.control.client import DaemonNotRunning, call
from meshllm.errors import MeshError
from meshllm.home import peer_home
from meshllm.mesh.identity import (
    IDENTITY_FILE,
    JoinToken,
    MeshSecret,
    create_identity,
)
from meshllm.mesh.peerstore import add_bootstrap


def home_option(f):  # type: ignore[no-untyped-def]
    """Accept --home after the command too (`meshllm init --home DIR`)."""

    def set_home(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)["home"] = value

    return click.option(
        "--home",
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=set_home,
        help="Peer home directory  [env: MESHLLM_HOME; default: ~/.meshllm]",
    )(f)


def home_of(ctx: click.Context) -> Path:
    return peer_home(ctx.obj.get("home"))


def init_home(
    home: Path,
    *,
    name: str | None = None,
    listen: str | None = None,
    token: JoinToken | None,
    stages: bool = True,
) -> bool:
    """Create identity, config and secret; returns False if the home was already set up."""
    if (home / IDENTITY_FILE).exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    create_identity(home)
    name = name or f"{socket.gethostname().split('.')[0]}-{secrets.token_hex(2)}"
    listen = listen or "/ip4/127.0.0.1/tcp/0"
    (home / CONFIG_FILE).write_text(default_config_text(name, listen, stages=stages))
    (token.secret if token else MeshSecret.generate()).save(home)
    if token:
        add_bootstrap(home, list(token.addrs))
    return True


@click.command("init")
@home_option
@click.option("--name", help="Display name of this peer (default: host name + random suffix).")
@click.option("--listen", help="Listen multiaddr  [default: /ip4/127.0.0.1/tcp/0]")
@click.option("--join", "token_text", metavar="TOKEN", help="Join the mesh of this invite token.")
@click.option(
    "--stages/--no-stages",
    default=True,
    show_default=True,
    help="--no-stages: this peer runs no layers; it keeps and serves model files (a laptop "
    "that converts models for a mesh of phones), answers queries and may lead.",
)
@click.pass_context
def init_cmd(
    ctx: click.Context, name: str | None, listen: str | None, token_text: str | None, stages: bool
):
    """Create this peer's home: key pair, config.toml and a new mesh secret (or a joined one)."""
    home = home_of(ctx)
    token = JoinToken.decode(token_text) if token_text else None
    if not init_home(home, name=name, listen=listen, token=token, stages=stages):
        click.echo(f"{home} is already initialised", err=True)
        return
    mesh = (token.secret if token else MeshSecret.load(home)).mesh_id
    click.echo(f"initialised {home} (mesh {mesh}{', joining' if token else ', new'})")


@click.command("join")
@home_option
@click.argument("token")
@click.pass_context
def join_cmd(ctx: click.Context, token: str) -> None:
    """Join the mesh of TOKEN (printed by `meshllm invite` on a member)."""
    home = home_of(ctx)
    tok = JoinToken.decode(token)
    if init_home(home, token=tok):
        click.echo(f"initialised {home} and joined mesh {tok.secret.mesh_id}")
        return
    current = MeshSecret.load(home)
    if current != tok.secret:
        try:
            call(home, "status", timeout=5)
            raise MeshError("this peer's daemon runs in another mesh: stop it, then join again")
        except DaemonNotRunning:
            pass
        tok.secret.save(home)
        click.echo(f"switched {home} to mesh {tok.secret.mesh_id}", err=True)
    add_bootstrap(home, list(tok.addrs))
    try:
        for addr in tok.addrs:
            result = call(home, "peers.add", addr=addr)
            click.echo(f"connected to {result['peer_id']}")
            break
    except DaemonNotRunning:
        click.echo("stored; the daemon connects when it starts (`meshllm daemon`)")


@click.command("invite")
@home_option
@click.pass_context
def invite_cmd(ctx: click.Context) -> None:
    """Print a join token: this peer's live addresses and the mesh secret. Keep it private."""
    home = home_of(ctx)
    status = call(home, "status")
    click.echo(JoinToken(MeshSecret.load(home), tuple(status["self"]["addrs"])).encode())


class ApiAddress(click.ParamType):
    """``[HOST:]PORT`` for ``daemon --api``: the ``[api]`` section it stands for."""

    name = "[HOST:]PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, ApiSection):
            return value
        text = str(value).strip()
        host, sep, port = text.rpartition(":")
        if sep and host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # [::1]:8080
        elif sep and ":" in host:
            self.fail(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8080", param, ctx)
        if not port.isdigit():
            self.fail(f"{text!r} is not [HOST:]PORT (e.g. 8080, 0 or 127.0.0.1:8080)", param, ctx)
        try:
            return ApiSection(enabled=True, host=host or ApiSection.host, port=int(port))
        except ConfigError as exc:
            self.fail(str(exc).removeprefix("[api] "), param, ctx)


@click.command("daemon")
@home_option
@click.option(
    "--api",
    type=ApiAddress(),
    default=None,
    help="Serve the OpenAI-compatible HTTP API on [HOST:]PORT for this run (HOST defaults "
    "to 127.0.0.1; PORT 0 picks a free port, shown by `status --json` under api), whatever "
    "config.toml's [api] says.",
)
@click.pass_context
def daemon_cmd(ctx: click.Context, api: ApiSection | None) -> None:
    """Run this peer's daemon in the foreground (stop with Ctrl-C or `meshllm stop`)."""
    from meshllm.daemon import run_daemon

    home = home_of(ctx)
    if not (home / IDENTITY_FILE).exists():
        raise MeshError(f"{home} is not initialised: run `meshllm init` or `meshllm join TOKEN`")
    run_daemon(home, api=api)


def _short(peer_id: str | None) -> str:
    if not peer_id:
        return "-"
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:6]}…{peer_id[-6:]}"


def print_status(st: dict[str, Any]) -> None:
    me = st["self"]
    click.echo(
        f"peer {_short(me['id'])} ({me['name']})  role {me['role']}  term {st['term']}  "
        f"leader {_short(st['leader'])}  mesh {st.get('mesh_id', '-')}  "
        f"members {len(st['members'])}"
    )
    print_peers(st["peers"])
    if st.get("api"):
        click.echo(f"OpenAI-compatible API at {st['api']['url']}")
    serving = st.get("serving") or {}
    if serving.get("plan"):
        names = {me["id"]: me["name"], **{p["id"]: p["name"] for p in st["peers"]}}
        click.echo()
        print_serving(serving, names)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_serving(serving: dict[str, Any], names: dict[str, str]) -> None:
    """The plan as a table: who runs which layers, how loaded, how much memory, how fast."""
    plan = serving["plan"]
    pred = plan.get("predicted") or {}
    how = plan["partitioner"] + (f"/{pred['objective']}" if pred.get("objective") else "")
    click.echo(
        f"serving {plan['model']}  plan {plan['epoch']} ({how}, balance {plan.get('balance')})  "
        + ("ready" if serving.get("ready") else "loading")
    )
    profiles = serving.get("profiles") or {}
    runtime = serving.get("runtime") or {}
    states = serving.get("states") or {}
    click.echo(
        f"  {'#':>2} {'PEER':15} {'NAME':12} {'LAYERS':>7} {'STATE':10} "
        f"{'RSS MiB':>8} {'BUDGET':>7} {'STEP ms':>8} {'STEPS/s':>8} {'REQS':>4}"
    )
    for i, (peer, start, stop) in enumerate(plan["stages"]):
        state = states.get(peer) or {}
        shown = state.get("state", "?")
        if shown == "fetching" and "progress" in state:
            shown = f"fetch {100 * state['progress']:.0f}%"
        run = runtime.get(peer) or {}
        stats = run.get("stage_stats") or {}
        current = stats.get("epoch") == plan["epoch"]
        budget = (profiles.get(peer) or {}).get("memory_bytes")
        step = stats.get("recent_s") if current else None
        click.echo(
            f"  {i:>2} {_short(peer):15} {names.get(peer, '?')[:12]:12} {f'{start}-{stop}':>7} "
            f"{shown[:10]:10} {_mib(run.get('rss_mb')):>8} "
            f"{_mib(budget / 2**20 if budget else None):>7} "
            f"{'-' if not step else f'{1000 * step:.1f}':>8} "
            f"{stats.get('steps_per_s', '-') if current else '-':>8} "
            f"{stats.get('open_requests', '-') if current else '-':>4}"
        )
        if state.get("state") == "error":
            click.echo(f"     error: {state.get('detail')}")
    if pred.get("step_s"):
        click.echo(
            f"  predicted: {1000 * pred['step_s']:.1f} ms per token alone, "
            f"bottleneck stage {1000 * pred.get('bottleneck_s', 0):.1f} ms"
        )
    last = (serving.get("balancer") or {}).get("last_decision")
    if last:
        click.echo(
            f"  balancer, plan {last.get('epoch')}: {last.get('outcome')}: {last.get('reason')}"
        )


def print_peers(peers: list[dict[str, Any]]) -> None:
    if not peers:
        click.echo("no other peers known")
        return
    click.echo(f"{'PEER':15} {'NAME':16} {'ROLE':9} {'ALIVE':5} {'SEEN':>7}  ADDRESS")
    for p in peers:
        seen = "-" if p["last_seen_s"] is None else f"{p['last_seen_s']:.1f}s"
        addr = p["addrs"][0] if p["addrs"] else "-"
        click.echo(
            f"{_short(p['id']):15} {p['name'][:16]:16} {p['role']:9} "
            f"{'yes' if p['alive'] else 'no':5} {seen:>7}  {addr}"
        )
        if p.get("refused"):
            click.echo(f"{'':15} refused: {p['refused']}")


@click.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show this peer, the leader, the term and every known peer."""
    st = call(home_of(ctx), "status")
    print_json(st) if as_json else print_status(st)


@click.command("stop")
@home_option
@click.pass_context
def stop_cmd(ctx: click.Context) -> None:
    """Stop this peer's daemon gracefully."""
    call(home_of(ctx), "stop")
    click.echo("stopping")


@click.group("peers", invoke_without_command=True)
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def peers_group(ctx: click.Context, as_json: bool) -> None:
    """List known peers (or add one: `meshllm peers add MULTIADDR`)."""
    if ctx.invoked_subcommand is None:
        peers = call(home_of(ctx), "peers")
        print_json(peers) if as_json else print_peers(peers)


@peers_group.command("add")
@click.argument("multiaddr")
@click.pass_context
def peers_add_cmd(ctx: click.Context, multiaddr: str) -> None:
    """Connect to the peer at MULTIADDR (it must hold this home's mesh secret)."""
    home = home_of(ctx)
    result = call(home, "peers.add", addr=multiaddr)
    add_bootstrap(home, [multiaddr])
    click.echo(f"connected to {result['peer_id']}")


@click.group("config")
def config_group() -> None:
    """Check configuration files."""


@config_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def config_check_cmd(files: tuple[str, ...]) -> None:
    """Validate FILES (peer config.toml); unknown keys and bad values are errors."""
    for f in files:
        load_config(Path(f))
        click.echo(f"{f}: ok")
