"""A local testbed: N daemons as separate processes, joined by one secret.

Without a profile the daemons listen on 127.0.0.1. With one (``up(root, profile=FILE)``, root
only) every peer gets a device class: its own network namespace with a bandwidth-shaped link,
a cgroup CPU quota and a memory figure for the planner (see :mod:`meshllm.netbed`).

``testbed.json`` in the testbed directory records every process started, and with a profile
every namespace, link and cgroup, so ``down`` stops exactly those processes (checking each pid
still runs a meshllm daemon before signalling it) and removes exactly those.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshllm import cgroups, netbed, testbed_profile
from meshllm.config import CONFIG_FILE, load_config
from meshllm.control.client import DaemonNotRunning, call
from meshllm.errors import MeshError
from meshllm.mesh.identity import JoinToken, MeshSecret
from meshllm.mesh.peerstore import add_bootstrap
from meshllm.netbed import Netbed
from meshllm.testbed_profile import CFS_PERIOD_US, MIN_CPU, TestbedError, TestbedProfile

STATE_FILE = "testbed.json"
DEFAULT_PEERS = 3


@dataclass(frozen=True)
class TestbedPeer:
    index: int
    home: str
    pid: int
    # With a profile: the peer's device class, network namespace and address there.
    device_class: str | None = None
    netns: str | None = None
    address: str | None = None


def _state_path(root: Path) -> Path:
    return root / STATE_FILE


def load_raw(root: Path) -> dict[str, Any]:
    try:
        return json.loads(_state_path(root).read_text())
    except FileNotFoundError:
        raise TestbedError(f"no testbed in {root} (start one with `meshllm testbed up`)") from None


def load_state(root: Path) -> list[TestbedPeer]:
    return [TestbedPeer(**p) for p in load_raw(root)["peers"]]


def load_network(root: Path) -> Netbed | None:
    """The namespaces, links and cgroups this testbed made (None: a loopback testbed)."""

    raw = load_raw(root).get("network")
    return None if raw is None else Netbed.from_json(raw)


def save_state(root: Path, peers: list[TestbedPeer], **sections: Any) -> None:
    """Write the peers; other sections (profile, network) are kept unless given anew."""
    try:
        state = load_raw(root)
    except (TestbedError, ValueError):
        state = {}
    state.update(sections, peers=[asdict(p) for p in peers])
    tmp = _state_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(root))  # never a half-written record of what to clean up


def is_our_daemon(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"meshllm" in b" ".join(cmdline) and b"daemon" in cmdline


def start_daemon(
    home: Path,
    extra_env: dict[str, str] | None = None,
    *,
    wrap: Sequence[str] = (),
    args: Sequence[str] = (),
) -> subprocess.Popen:
    """Start the daemon of *home*; *wrap* is a command prefix, e.g. one entering a namespace
    that execs the rest (so the pid stays the daemon's); *args* go to `meshllm daemon`."""
    log = (home / "daemon.log").open("ab")
    env = dict(os.environ, **(extra_env or {}))
    env.pop("MESHLLM_HOME", None)
    argv = [sys.executable, "-m", "meshllm", "--home", str(home), "daemon", *args]
    return subprocess.Popen(
        [*wrap, *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )


def wait_ready(home: Path, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> dict:
    """Poll the control socket until the daemon answers; returns its status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(home, "status", timeout=5)
        except DaemonNotRunning:
            if proc is not None and proc.poll() is not None:
                tail = (home / "daemon.log").read_text(errors="replace")[-2000:]
                raise TestbedError(
                    f"daemon in {home} exited ({proc.returncode}):\n{tail}"
                ) from None
            if time.monotonic() > deadline:
                raise TestbedError(f"daemon in {home} did not come up in {timeout:.0f} s") from None
            time.sleep(0.05)


def up(
    root: Path,
    n: int | None = None,
    *,
    profile: Path | None = None,
    transport: str | None = None,
    config: dict[str, dict[str, str]] | None = None,
    report: Callable[[str], None] = lambda _m: None,
) -> list[TestbedPeer]:
    """Start *n* peers (default 3) on loopback, or with *profile* one per ``[[peer]]`` of it,
    each in its own namespace and cgroup (needs root); returns once they form one mesh.

    *transport* sets ``[mesh] transport`` of every peer (a plugin's, say) before it starts;
    *config* sets other keys, by section (values TOML-encoded, as ``set_config_keys``).
    """
    from meshllm.commands.peer import init_home

    if transport is not None:
        from meshllm.plugins import TransportRegistry, get_plugin_manager

        TransportRegistry(get_plugin_manager()).get(transport)  # unknown: an error, with the list

    prof = None
    if profile is not None:
        prof = testbed_profile.load_profile(profile)
        if n is not None and n != len(prof.peers):
            raise TestbedError(
                f"--peers {n} conflicts with the profile {profile}, which has "
                f"{len(prof.peers)} peers: leave out --peers"
            )
        n = len(prof.peers)
    n = DEFAULT_PEERS if n is None else n
    if n < 1:
        raise TestbedError("a testbed needs at least one peer")
    cpu_mount = netbed.check_host() if prof is not None else None
    if _state_path(root).exists() and any(is_our_daemon(p.pid) for p in load_state(root)):
        raise TestbedError(f"a testbed is already running in {root}: `meshllm testbed down` first")
    root.mkdir(parents=True, exist_ok=True)
    # A testbed that died without `down` may have left its network behind: it is recorded.
    down(root)
    net = netbed.plan(root, prof, cpu_mount=cpu_mount) if prof is not None else None
    peers: list[TestbedPeer] = []
    token: JoinToken | None = None
    secret: MeshSecret | None = None
    try:
        if net is not None and prof is not None:
            # Recorded before it exists: whatever part of it gets made, `down` removes.
            save_state(root, [], network=net.to_json(), profile=profile_record(profile, prof))
            netbed.create(net)
            report(f"network {net.subnet} in namespaces {net.prefix}-*, cgroups {net.cgroup_dir}")
        for i in range(n):
            home = root / f"peer-{i}"
            np = net.peers[i] if net is not None else None
            name = prof.peers[i].name if prof is not None else f"peer-{i}"
            fresh = init_home(home, name=name, listen=np.listen if np else None, token=token)
            if not fresh and token is not None:
                add_bootstrap(home, list(token.addrs))  # a re-used home: ports are new
            if np is not None:
                set_peer_config(home, listen=np.listen, memory_limit_mb=np.memory_mb)
            if prof is not None and not prof.peers[i].device_class.stages:
                set_config_keys(home, "peer", {"stages": "false"})
            if transport is not None:
                set_config_keys(home, "mesh", {"transport": json.dumps(transport)})
            for section, values in (config or {}).items():
                set_config_keys(home, section, values)
            if secret is None:
                secret = MeshSecret.load(home)
            wrap = netbed.peer_command(np, []) if np is not None else ()
            proc = start_daemon(home, wrap=wrap)
            peers.append(
                TestbedPeer(i, str(home), proc.pid)
                if np is None
                else TestbedPeer(i, str(home), proc.pid, np.device_class, np.netns, np.address)
            )
            save_state(root, peers)
            status = wait_ready(home, proc)
            # Each peer joins through the previous one: the mesh forms from a single chain.
            token = JoinToken(secret, tuple(status["self"]["addrs"]))
            where = (
                f" [{np.device_class}: {np.cpu:g} cpu, {np.bandwidth_mbit:g} Mbit/s, "
                f"{np.memory_mb} MiB, {np.address}]"
                if np
                else ""
            )
            report(f"peer-{i} up: {status['self']['id']} pid {proc.pid}{where}")
        wait_for_mesh([Path(p.home) for p in peers], timeout=30)
    except BaseException:
        down(root)
        raise
    return peers


def profile_record(path: Path, prof: TestbedProfile) -> dict[str, Any]:
    return {
        "source": str(path.resolve()),
        "classes": {c.name: asdict(c) for c in prof.classes},
        "peers": [{"name": p.name, "class": p.device_class.name} for p in prof.peers],
    }


def set_peer_config(home: Path, *, listen: str, memory_limit_mb: int) -> None:
    """Point *home*'s config.toml at *listen* and *memory_limit_mb*, keeping everything else
    (comments included) as it is; the result is checked as `meshllm config check` would."""
    values = {"listen": json.dumps([listen]), "memory_limit_mb": str(memory_limit_mb)}
    set_config_keys(home, "peer", values)


def set_config_keys(home: Path, section: str, values: dict[str, str]) -> None:
    """Set *values* (TOML-encoded already) in *section* of *home*'s config.toml, replacing
    those keys where they are and keeping everything else (comments included) as it is; the
    result is checked as `meshllm config check` would."""
    path = home / CONFIG_FILE
    values = dict(values)
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"[{section}]")
    except StopIteration:
        lines[:0] = [f"[{section}]", ""]
        start = 0
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
        len(lines),
    )
    last = start
    for i in range(start + 1, end):
        key = lines[i].split("=", 1)[0].strip()
        if key in values:
            lines[i] = f"{key} = {values.pop(key)}"
        if lines[i].strip():
            last = i
    lines[last + 1 : last + 1] = [f"{k} = {v}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    load_config(path)


def wait_for_mesh(homes: list[Path], timeout: float) -> None:
    """Until every peer sees all of them alive and they agree on one leader."""
    deadline = time.monotonic() + timeout
    while True:
        views = [call(h, "status", timeout=5) for h in homes]
        if (
            all(len(v["members"]) == len(homes) for v in views)
            and len({v["leader"] for v in views}) == 1
            and views[0]["leader"] is not None
        ):
            return
        if time.monotonic() > deadline:
            raise TestbedError(f"the {len(homes)} peers did not form one mesh in {timeout:.0f} s")
        time.sleep(0.1)


def resident_peak(pid: int) -> int | None:
    """Process *pid*'s peak resident memory (VmHWM), or None where it cannot be read."""
    kib = cgroups.keyed_number(Path(f"/proc/{pid}/status"), "VmHWM:")
    return None if kib is None else kib * 1024


def status(root: Path) -> list[dict]:
    """Every peer's entry: where it runs, its daemon's status (or why there is none) and, on
    a phone testbed, its memory cgroup's limit, peak and OOM kills."""
    out = []
    net = load_network(root)
    for p in load_state(root):
        entry: dict = {"index": p.index, "home": p.home, "pid": p.pid}
        if p.device_class is not None:
            entry.update({"class": p.device_class, "netns": p.netns, "address": p.address})
        if net is not None and p.index < len(net.peers):
            entry.update(netbed.memory_usage(net.peers[p.index]))
            entry["resident_peak_bytes"] = resident_peak(p.pid) if is_our_daemon(p.pid) else None
        try:
            entry["status"] = call(Path(p.home), "status", timeout=5)
        except MeshError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def throttle(root: Path, peer: int | str, cpu: float | None) -> dict[str, Any]:
    """Give one peer of a ``--profile`` testbed *cpu* cores from now on, while it runs
    (None or 0: no quota at all), and record it in testbed.json; returns what was done.

    *peer* is its index (as ``testbed status`` shows it), ``peer-<index>`` or its profile name.
    The new figure is what the cgroup enforces; the planner's memory figure and the link stay.
    """
    import dataclasses

    net = load_network(root)
    if net is None:
        raise TestbedError(
            f"throttle needs a testbed started with --profile: the one in {root} runs on "
            "loopback, with no cgroups to change"
        )
    index = _peer_index(root, net, peer)
    if cpu is not None and (not math.isfinite(cpu) or cpu < 0):
        raise TestbedError(f"cpu must be a number of cores, not {cpu!r}")
    if cpu is not None and 0 < cpu < MIN_CPU:
        # Checked here too, before the root check, so the fix named is the right one.
        raise TestbedError(
            f"cpu must be at least {MIN_CPU:g} core (the kernel's shortest quota at "
            f"a {CFS_PERIOD_US} µs period), or none / 0 to remove the quota; not {cpu:g}"
        )
    if os.geteuid() != 0:
        raise TestbedError("throttle writes the peer's cgroup CPU quota: run it as root (sudo)")
    old = net.peers[index]
    # No quota is what set_cpu_quota gives for as many cores as the host has; that figure is
    # also what gets recorded, so the record stays a number that `up` could have set.
    cores = cpu if cpu else float(cgroups.host_cpus())
    quota = netbed.set_cpu_quota(old, cores)
    peers = list(net.peers)
    peers[index] = dataclasses.replace(old, cpu=cores)
    save_state(
        root, load_state(root), network=dataclasses.replace(net, peers=tuple(peers)).to_json()
    )
    return {
        "index": index,
        "name": _peer_names(root, net)[index],
        "class": old.device_class,
        "cgroup": old.cgroup,
        # None: no quota (as many cores as the host has, or more)
        "previous_cpu": None if old.cpu >= cgroups.host_cpus() else old.cpu,
        "cpu": None if quota == -1 else cores,
        "quota_us": quota,
        "period_us": CFS_PERIOD_US,
    }


def _peer_names(root: Path, net: Netbed) -> list[str]:
    """Each peer's profile name (``peer-<i>`` where the record has none)."""
    recorded = (load_raw(root).get("profile") or {}).get("peers") or []
    names = [f"peer-{p.index}" for p in net.peers]
    for i, entry in enumerate(recorded[: len(names)]):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names[i] = entry["name"]
    return names


def _peer_index(root: Path, net: Netbed, peer: int | str) -> int:
    n = len(net.peers)
    names = _peer_names(root, net)
    index = peer
    if isinstance(peer, str):
        key = peer.strip()
        if key in names:  # a profile name first: a peer may well be called "2"
            return names.index(key)
        digits = key.removeprefix("peer-")
        if digits.isdigit():
            index = int(digits)
    if isinstance(index, int) and 0 <= index < n:
        return index
    raise TestbedError(
        f"unknown peer {peer!r}: give an index 0-{n - 1}, peer-<index> or a name "
        f"({', '.join(names)})"
    )


def down(root: Path, grace: float = 5.0) -> int:
    """Stop every daemon this testbed started, then remove the namespaces, links and cgroups
    it made; returns how many daemons were running. If some of the network cannot be removed,
    raises and keeps the record, so running it again retries."""

    try:
        peers = load_state(root)
        net = load_network(root)
    except TestbedError:
        return 0
    if net is not None:
        netbed.check_host()  # its daemons run as root, and only root can remove the rest
    running = [p for p in peers if is_our_daemon(p.pid)]
    for p in running:
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in running:
        while is_our_daemon(p.pid) and time.monotonic() < deadline:
            reap(p.pid)
            time.sleep(0.05)
        if is_our_daemon(p.pid):
            os.kill(p.pid, signal.SIGKILL)
        reap(p.pid)
    if net is not None:
        netbed.teardown(net)
    _state_path(root).unlink(missing_ok=True)
    return len(running)


def exit_on_sigterm() -> None:
    """Let SIGTERM end this process through SystemExit, so that its ``finally`` blocks (a
    ``down`` among them) run. Python's default ends the process at once: a benchmark stopped
    by ``timeout`` left its testbed's daemons running, each one holding a core."""
    signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
