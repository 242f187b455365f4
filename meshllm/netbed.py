"""Phone-like peers on one Linux host: a network namespace, a shaped link and a CPU quota each.

This is the privileged plumbing behind ``meshllm testbed up --profile FILE``; starting and
stopping the daemons stays in :mod:`meshllm.testbed`.

Topology (one testbed, prefix ``mltXXXXX`` derived from its directory)::

    mltXXXXX-hub  (netns)   bridge mltXXXXX-br, ports mltXXXXX-h0 .. mltXXXXX-hN
                                     |                       |
    mltXXXXX-p0   (netns)   mltXXXXX-p0 10.213.B.1/24   ...  mltXXXXX-pN 10.213.B.N+1/24

Every veth pair is created straight inside the namespaces (never in the host's), so the host's
interfaces, routes and addresses are never touched and two testbeds cannot collide. A ``tc tbf``
qdisc with the peer's class rate sits on *both* ends of its veth: the peer-side end shapes what
the phone sends, the hub-side end what it receives (a qdisc only shapes egress). A transfer
between two peers therefore runs at the slower of their two rates, like two phones on one
access point.

CPU and memory: each peer's processes live in the cgroup v1 directories
``<cpu mount>/meshllm-testbed/<prefix>/p<i>``, with a CFS quota of ``cpu`` cores, and
``<memory mount>/meshllm-testbed/<prefix>/p<i>``, whose ``memory.limit_in_bytes`` is the class's
``memory_mb`` with no swap beyond it: a peer that goes over is killed by the kernel's OOM killer,
as Android's low-memory killer kills an app. The daemon reads its budget for planning from that
limit (see :func:`meshllm.device.memory_budget`). A daemon starts already inside its namespace
and both cgroups (:func:`peer_command`).

Everything a testbed creates follows from its plan (:func:`plan`), which the testbed records
before creating anything: :func:`teardown` removes exactly that, is idempotent and carries on
past failures, so a half-built or half-removed testbed is always cleaned up by running it again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshllm import cgroups
from meshllm.testbed_profile import (
    TestbedError,
    TestbedProfile,
)

CGROUP_PARENT = "meshllm-testbed"
DEFAULT_CPU_MOUNT = Path("/sys/fs/cgroup/cpu")
DEFAULT_MEMORY_MOUNT = Path("/sys/fs/cgroup/memory")
NETNS_DIR = Path("/var/run/netns")  # where `ip netns add` mounts named namespaces
# 10.213.0.0/16 is rarely used by home, office or container networks; the third octet comes
# from the testbed's directory so two testbeds' logs are easy to tell apart. The addresses
# never leave the testbed's namespaces, so even a clash could not reach another network.
SUBNET_PREFIX = "10.213"

# tbf: the bucket holds 5 ms of traffic at the class rate, and at least 16 KiB. Much less and
# the qdisc's timer (and the kernel's scheduling granularity) caps the rate below the target;
# much more and a "20 Mbit/s" link would pass large bursts at veth speed. (tbf splits GSO
# packets larger than the bucket itself, so a small bucket is fine with veth offloads.)
TBF_BURST_S = 0.005
TBF_MIN_BURST_BYTES = 16 * 1024
# Packets may wait up to 50 ms in the queue before tbf drops them: about a phone radio's
# buffering, enough for TCP to keep the link full, small enough to bound added latency.
TBF_LATENCY_MS = 50


# --- the plan: every name and address, derived from the testbed directory ----------------------


@dataclass(frozen=True)
class NetPeer:
    """One peer's namespace, link, address and cgroup."""

    index: int
    device_class: str
    cpu: float
    bandwidth_mbit: float
    memory_mb: int
    netns: str
    veth_peer: str  # inside netns, holds the address
    veth_hub: str  # inside the hub namespace, a port of the bridge
    address: str  # IPv4, no prefix length
    cgroup: str  # absolute cgroup v1 cpu directory
    # Absolute cgroup v1 memory directory ("": none, in a testbed recorded before there was
    # one; no limit in it when memory_mb is 0).
    memory_cgroup: str = ""

    @property
    def listen(self) -> str:
        return f"/ip4/{self.address}/tcp/0"


@dataclass(frozen=True)
class Netbed:
    """Everything one testbed creates; recorded in testbed.json before any of it exists."""

    prefix: str
    subnet: str
    hub_netns: str
    bridge: str
    cgroup_dir: str  # <cpu mount>/meshllm-testbed/<prefix>, parent of the peers' cgroups
    peers: tuple[NetPeer, ...]
    memory_cgroup_dir: str = ""  # the same under the memory mount

    @property
    def cgroups(self) -> list[str]:
        """Every cgroup directory it makes, leaves first (the order they can be removed in)."""
        leaves = [cg for p in self.peers for cg in (p.cgroup, p.memory_cgroup) if cg]
        return [*leaves, *(d for d in (self.cgroup_dir, self.memory_cgroup_dir) if d)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Netbed:
        return cls(**{**data, "peers": tuple(NetPeer(**p) for p in data["peers"])})


def prefix_for(root: Path) -> str:
    """``mlt`` + 5 hex digits of the testbed directory's absolute path: stable for one directory
    (so `down`, or a rerun of `up`, finds the same names), distinct between directories, and
    short enough that ``<prefix>-h63`` fits Linux's 15-character interface names."""
    return "mlt" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:5]


def plan(
    root: Path,
    profile: TestbedProfile,
    *,
    cpu_mount: Path | None = None,
    memory_mount: Path | None = None,
) -> Netbed:
    """Names, addresses and cgroups for *profile*'s peers; creates nothing."""
    prefix = prefix_for(root)
    octet = int(hashlib.sha256(prefix.encode()).hexdigest()[:2], 16)
    cpu_mount = cpu_mount or cgroups.find_cpu_mount() or DEFAULT_CPU_MOUNT
    cgroup_dir = cpu_mount / CGROUP_PARENT / prefix
    memory_mount = memory_mount or cgroups.find_mount("memory") or DEFAULT_MEMORY_MOUNT
    memory_dir = memory_mount / CGROUP_PARENT / prefix
    peers = tuple(
        NetPeer(
            index=i,
            device_class=p.device_class.name,
            cpu=p.device_class.cpu,
            bandwidth_mbit=p.device_class.bandwidth_mbit,
            memory_mb=p.device_class.memory_mb,
            netns=f"{prefix}-p{i}",
            veth_peer=f"{prefix}-p{i}",
            veth_hub=f"{prefix}-h{i}",
            address=f"{SUBNET_PREFIX}.{octet}.{i + 1}",
            cgroup=str(cgroup_dir / f"p{i}"),
            memory_cgroup=str(memory_dir / f"p{i}"),
        )
        for i, p in enumerate(profile.peers)
    )
    return Netbed(
        prefix=prefix,
        subnet=f"{SUBNET_PREFIX}.{octet}.0/24",
        hub_netns=f"{prefix}-hub",
        bridge=f"{prefix}-br",
        cgroup_dir=str(cgroup_dir),
        peers=peers,
        memory_cgroup_dir=str(memory_dir),
    )


# --- the host ---------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    # Non-login root shells do not always have the sbin directories on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def check_host() -> Path:
    """Refuse clearly, naming everything missing, unless this host can build a netbed;
    returns the cgroup v1 cpu mount."""
    problems = []
    if os.geteuid() != 0:
        problems.append(
            "it must run as root (network namespaces, tc qdiscs and cgroups need it): "
            "run it with sudo, or leave out --profile for the unprivileged loopback testbed"
        )
    missing = [t for t in ("ip", "tc") if find_tool(t) is None]
    if missing:
        problems.append(
            f"{' and '.join(f'`{t}`' for t in missing)} not found: install iproute2 "
            "(tools/setup.sh does, as root)"
        )
    mount = cgroups.find_cpu_mount()
    for controller, probe, where in (
        ("cpu", "cpu.cfs_quota_us", mount),
        ("memory", "memory.limit_in_bytes", cgroups.find_mount("memory")),
    ):
        if where is None or not (where / probe).exists():
            problems.append(
                f"no cgroup v1 `{controller}` controller is mounted (looked for a `cgroup` "
                f"mount with the `{controller}` option in /proc/mounts; cgroup v2-only hosts "
                "are not supported)"
            )
    if problems:
        raise TestbedError("cannot build the phone testbed (--profile): " + "; ".join(problems))
    assert mount is not None
    return mount


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    tool = find_tool(argv[0]) or argv[0]
    try:
        proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"`{' '.join(argv)}` failed: {exc}") from None
    if proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _ok(*argv: str) -> bool:
    tool = find_tool(argv[0]) or argv[0]
    return subprocess.run([tool, *argv[1:]], capture_output=True, timeout=30).returncode == 0


def list_netns() -> set[str]:
    out = _run("ip", "netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _tbf(ns: str, dev: str, mbit: float) -> None:
    rate_bps = round(mbit * 1_000_000)
    burst = max(TBF_MIN_BURST_BYTES, round(rate_bps / 8 * TBF_BURST_S))
    _run(
        "tc",
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{rate_bps}bit",
        "burst",
        str(burst),
        "latency",
        f"{TBF_LATENCY_MS}ms",
    )


# --- create, enter, throttle, remove ---------------------------------------------------------


def create(net: Netbed) -> None:
    """Build the namespaces, bridge, shaped veths and cgroups of *net*.

    Refuses when one of its namespaces exists already (leftovers this testbed has no record of);
    on any other failure the caller runs :func:`teardown`, which removes what was made."""
    clashes = sorted({net.hub_netns, *(p.netns for p in net.peers)} & list_netns())
    if clashes:
        raise TestbedError(
            f"network namespace {clashes[0]} exists already: leftovers of an earlier testbed "
            f"in this directory? remove them with `ip netns del NAME` for {', '.join(clashes)}"
        )
    hub = net.hub_netns
    _run("ip", "netns", "add", hub)
    _run("ip", "-n", hub, "link", "add", net.bridge, "type", "bridge")
    _run("ip", "-n", hub, "link", "set", net.bridge, "up")
    Path(net.cgroup_dir).mkdir(parents=True, exist_ok=True)
    if net.memory_cgroup_dir:
        Path(net.memory_cgroup_dir).mkdir(parents=True, exist_ok=True)
    for p in net.peers:
        _run("ip", "netns", "add", p.netns)
        _run("ip", "-n", p.netns, "link", "set", "lo", "up")
        # Created inside the hub namespace with its other end straight in the peer's: no
        # interface ever appears in the host's namespace.
        _run(
            "ip",
            "-n",
            hub,
            "link",
            "add",
            p.veth_hub,
            "type",
            "veth",
            "peer",
            "name",
            p.veth_peer,
            "netns",
            p.netns,
        )
        _run("ip", "-n", hub, "link", "set", p.veth_hub, "master", net.bridge, "up")
        _run("ip", "-n", p.netns, "addr", "add", f"{p.address}/24", "dev", p.veth_peer)
        _run("ip", "-n", p.netns, "link", "set", p.veth_peer, "up")
        _tbf(p.netns, p.veth_peer, p.bandwidth_mbit)  # what the phone sends
        _tbf(hub, p.veth_hub, p.bandwidth_mbit)  # what it receives
        Path(p.cgroup).mkdir(exist_ok=True)
        set_cpu_quota(p, p.cpu)
        if p.memory_cgroup:
            Path(p.memory_cgroup).mkdir(exist_ok=True)
            set_memory_limit(p, p.memory_mb)


def set_cpu_quota(peer: NetPeer, cpu: float) -> int:
    """Give *peer* *cpu* cores from now on (also while it runs); see cgroups.set_cpu_quota."""
    return cgroups.set_cpu_quota(Path(peer.cgroup), cpu)


def set_memory_limit(peer: NetPeer, memory_mb: int) -> int:
    """Cap *peer* at *memory_mb* MiB (0: no cap); see cgroups.set_memory_limit."""
    return cgroups.set_memory_limit(Path(peer.memory_cgroup), memory_mb)


def memory_usage(peer: NetPeer) -> dict[str, int | None]:
    """*peer*'s memory limit, peak, usage and OOM kills (None each without a memory cgroup)."""
    return cgroups.memory_usage(Path(peer.memory_cgroup) if peer.memory_cgroup else None)


def netns_command(netns: str, argv: Sequence[str]) -> list[str]:
    """*argv* run inside network namespace *netns* (no cgroup), as the same process.

    ``nsenter --net`` (util-linux) switches only the network namespace. ``ip netns exec``, the
    fallback, also gives the command a private mount namespace with a fresh /sys, which hides
    /sys/fs/cgroup from it: a daemon could then not read its own cgroup limits."""
    nsenter = find_tool("nsenter")
    if nsenter is not None:
        return [nsenter, f"--net={NETNS_DIR / netns}", "--", *argv]
    return [find_tool("ip") or "ip", "netns", "exec", netns, *argv]


def peer_command(peer: NetPeer, argv: Sequence[str]) -> list[str]:
    """*argv* wrapped so that it starts inside *peer*'s cgroup and network namespace.

    The wrapping shell writes its own pid to the cgroup, then execs :func:`netns_command`,
    which execs *argv*: one process throughout (the pid Popen reports is the command's), and
    it is in the cgroup before *argv*'s first instruction, so every thread and child it ever
    makes inherits the quota. (Moving the pid after spawning would let start-up run
    unthrottled; a preexec_fn would do the same but is unsafe in a parent that has threads.)"""
    # A testbed recorded before peers had a memory cgroup joins the cpu one twice.
    memory = peer.memory_cgroup or peer.cgroup
    return [
        "/bin/sh",
        "-c",
        'echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" && shift 2 && exec "$@"',
        "meshllm-netbed",
        peer.cgroup,
        memory,
        *netns_command(peer.netns, argv),
    ]


def _processes_inside(net: Netbed, present: set[str]) -> set[int]:
    pids: set[int] = set()
    for cg in net.cgroups:
        pids |= cgroups.pids(Path(cg))
    for ns in (*(p.netns for p in net.peers), net.hub_netns):
        if ns in present:
            with contextlib.suppress(TestbedError):
                pids |= {int(x) for x in _run("ip", "netns", "pids", ns).stdout.split()}
    pids.discard(os.getpid())
    return {pid for pid in pids if cgroups.alive(pid)}


def teardown(net: Netbed, timeout: float = 5.0) -> None:
    """Remove everything *net* describes that exists: idempotent, and it keeps going past
    failures; raises :class:`TestbedError` listing what could not be removed."""
    errors: list[str] = []
    present = list_netns()
    # Whatever still runs inside the testbed (the caller stops the daemons first) would keep a
    # deleted namespace alive and make the cgroup's rmdir fail with EBUSY: it belongs to the
    # testbed, so it goes too. A killed process leaves the cgroup's task list at once but keeps
    # the cgroup busy until it is reaped, so wait for those too (reaping our own children).
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while pids := _processes_inside(net, present) | {p for p in killed if cgroups.alive(p)}:
        for pid in pids - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        if time.monotonic() > deadline:
            errors.append(f"processes {sorted(pids)} would not exit")
            break
        time.sleep(0.02)
    # Deleting either end of a veth deletes the pair and the qdiscs on both ends; deleting a
    # namespace would too, but explicitly is also right when the namespace outlives us.
    for p in net.peers:
        if net.hub_netns in present and _ok("ip", "-n", net.hub_netns, "link", "show", p.veth_hub):
            try:
                _run("ip", "-n", net.hub_netns, "link", "del", p.veth_hub)
            except TestbedError as exc:
                errors.append(str(exc))
    if net.hub_netns in present and _ok("ip", "-n", net.hub_netns, "link", "show", net.bridge):
        try:
            _run("ip", "-n", net.hub_netns, "link", "del", net.bridge)
        except TestbedError as exc:
            errors.append(str(exc))
    for ns in (*(p.netns for p in net.peers), net.hub_netns):
        if ns in present:
            try:
                _run("ip", "netns", "del", ns)
            except TestbedError as exc:
                errors.append(str(exc))
    # Leaves first: a cgroup directory can only go once it has no children and no tasks.
    rm_deadline = max(deadline, time.monotonic() + 1.0)
    for cg in net.cgroups:
        if err := cgroups.remove(Path(cg), rm_deadline):
            errors.append(err)
    # The shared parents go once no other testbed uses them.
    for top in (net.cgroup_dir, net.memory_cgroup_dir):
        if not top:
            continue
        try:
            Path(top).parent.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY):
                errors.append(f"cannot remove cgroup {Path(top).parent}: {exc.strerror}")
    errors += [f"{what} is still there" for what in leftovers(net)]
    if errors:
        raise TestbedError(f"could not remove all of testbed {net.prefix}: " + "; ".join(errors))


def leftovers(net: Netbed) -> list[str]:
    """What of *net* exists: namespaces, host-side links with its prefix, cgroup directories."""
    ours = f"{net.prefix}-"
    found = [f"network namespace {ns}" for ns in sorted(list_netns()) if ns.startswith(ours)]
    links = _run("ip", "-o", "link", "show").stdout.splitlines()
    found += [
        f"link {name}"
        for line in links
        if (name := line.split(":")[1].strip().split("@")[0]).startswith(ours)
    ]
    found += [f"cgroup {cg}" for cg in net.cgroups if Path(cg).exists()]
    return found
