"""``meshllm testbed``: many local daemons for trying things out and for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meshllm import cgroups, testbed
from meshllm.commands.common import print_json, progress

DEFAULT_DIR = Path(".meshllm-testbed")
dir_option = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Directory holding the peers' homes and the testbed state.",
)


@click.group("testbed")
def testbed_group() -> None:
    """Start, inspect and stop a local testbed of peers: on 127.0.0.1, or as phone-like
    devices in network namespaces and cgroups (--profile, root only)."""


@testbed_group.command("up")
@click.option(
    "--peers",
    "n",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="How many peers  [default: 3, or the profile's]",
)
@click.option(
    "--profile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Device classes and peers (e.g. configs/testbed/phones.toml): each peer gets its own "
    "network namespace, shaped link and CPU quota. Needs root.",
)
@click.option(
    "--transport",
    default=None,
    help="[mesh] transport of every peer, e.g. a plugin's  [default: the config's, libp2p]",
)
@dir_option
def up_cmd(n: int | None, profile: Path | None, transport: str | None, root: Path) -> None:
    """Start the peers as separate processes, each joining through the previous one."""
    peers = testbed.up(root, n, profile=profile, transport=transport, report=progress)
    click.echo(f"{len(peers)} peers up in {root}")


@testbed_group.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status_cmd(root: Path, as_json: bool) -> None:
    """Show every testbed peer's view: role, term, leader, members (and, on a phone testbed,
    its device class, CPU quota, address, and peak memory against its cap)."""
    entries = testbed.status(root)
    # The class, CPU and address columns only for a testbed started with --profile. The CPU is
    # the recorded quota, which `testbed throttle` may have changed since `up`.
    net = testbed.load_network(root)
    if net is not None:
        for e, np in zip(entries, net.peers, strict=False):
            e["cpu"] = None if np.cpu >= cgroups.host_cpus() else np.cpu  # None: no quota
    if as_json:
        print_json(entries)
        return
    profiled = any("class" in e for e in entries)
    device = f" {'CLASS':10} {'CPU':>5} {'ADDRESS':15} {'PEAK/CAP MiB':>13}" if profiled else ""
    click.echo(f"{'PEER':7} {'PID':>7}{device} {'ROLE':9} {'TERM':>4} {'MEMBERS':>7}  LEADER")
    for e in entries:
        device = (
            f" {e.get('class') or '-':10} {_cores(e.get('cpu')):>5} {e.get('address') or '-':15}"
            f" {_memory(e):>13}"
            if profiled
            else ""
        )
        st = e.get("status")
        if st is None:
            click.echo(f"peer-{e['index']:<2} {e['pid']:>7}{device} down      {e['error']}")
            continue
        click.echo(
            f"peer-{e['index']:<2} {e['pid']:>7}{device} {st['self']['role']:9} {st['term']:>4} "
            f"{len(st['members']):>7}  {st['leader'] or '-'}"
        )


def _memory(entry: dict) -> str:
    """The daemon's peak resident memory over its cap in MiB, and the OOM kills when there
    were any ("-": not known). With the daemon gone, the cgroup's peak (page cache too)."""
    peak = entry.get("resident_peak_bytes") or entry.get("memory_peak_bytes")
    cap = entry.get("memory_limit_bytes")
    if peak is None:
        return "-"
    text = f"{peak >> 20}/{'none' if cap is None else cap >> 20}"
    kills = entry.get("oom_kills")
    return f"{text} oom{kills}" if kills else text


def _cores(cpu: float | None) -> str:
    return "none" if cpu is None else f"{cpu:g}"


class _Cores(click.ParamType):
    """Cores as a number, or none / 0 for no quota (None)."""

    name = "CPU"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | None:
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text in ("none", "off", "unlimited"):
            return None
        try:
            cores = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number of cores (e.g. 0.25) or none", param, ctx)
        # 0 reads as "no limit", as a zero cgroup quota never would (the kernel refuses it).
        return None if cores == 0 else cores


@testbed_group.command("throttle")
@click.argument("peer")
@click.argument("cpu", type=_Cores())
@dir_option
def throttle_cmd(peer: str, cpu: float | None, root: Path) -> None:
    """Change one emulated phone's CPU quota while it runs: PEER is its index (as `testbed
    status` shows it) or its name, CPU its cores (e.g. 0.25), or none / 0 for no quota.
    Needs root and a testbed started with --profile."""
    done = testbed.throttle(root, peer, cpu)
    before = "no quota" if done["previous_cpu"] is None else f"{done['previous_cpu']:g} core"
    after = (
        "no quota"
        if done["cpu"] is None
        else f"{done['cpu']:g} core (quota {done['quota_us']} µs per {done['period_us']} µs)"
    )
    click.echo(f"peer-{done['index']} ({done['name']}, {done['class']}): cpu {before} -> {after}")


@testbed_group.command("down")
@dir_option
def down_cmd(root: Path) -> None:
    """Stop every daemon the testbed started (SIGTERM, then SIGKILL after 5 s), then remove
    the namespaces, links and cgroups it made."""
    n = testbed.down(root)
    click.echo(f"stopped {n} daemon(s)")
