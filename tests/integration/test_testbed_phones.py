"""A real phone testbed: network namespaces, tbf-shaped veths, cgroup CPU quotas, as root.

Builds a three-phone testbed from a profile, checks every piece the kernel holds (namespaces,
qdiscs, cgroups, which namespace and cgroup each daemon runs in), that the daemons formed one
mesh over their namespace addresses, that the links really run at their class rates and the
CPU quota really throttles, and that `down` leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshllm import cgroups, netbed, testbed, testbed_profile
from meshllm.control.client import call
from meshllm.testbed_profile import CFS_PERIOD_US
from tests.integration.mesh_helpers import PHONES3, cli, needs_phones

PROFILE = PHONES3

NBYTES = 2_000_000

# Receives until EOF, then answers with the byte count (so the sender's clock stops only once
# everything has crossed both shapers).
SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
n = 0
while chunk := conn.recv(1 << 16):
    n += len(chunk)
conn.sendall(str(n).encode())
"""
CLIENT = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
data = b"x" * int(sys.argv[3])
t0 = time.perf_counter()
conn.sendall(data)
conn.shutdown(socket.SHUT_WR)
got = conn.recv(64)
print(time.perf_counter() - t0, got.decode())
"""
# Spins for one second of wall time and reports the share of a core it got.
BURN = """
import time
t0, c0 = time.monotonic(), time.process_time()
while time.monotonic() - t0 < 1.0:
    pass
print((time.process_time() - c0) / (time.monotonic() - t0))
"""
# Touches the given MiB, one page at a time (more than the peer's cap: the kernel kills it).
HOG = """
import mmap
size = %d << 20
block = mmap.mmap(-1, size)
for i in range(0, size, 4096):
    block[i] = 1
print("survived")
"""

pytestmark = needs_phones


def transfer_mbit(src_ns: str, dst_ns: str, dst_addr: str, nbytes: int = NBYTES) -> float:
    """Goodput of one TCP transfer from namespace *src_ns* to *dst_addr* in *dst_ns*."""
    server = subprocess.Popen(
        netbed.netns_command(dst_ns, [sys.executable, "-c", SERVER, dst_addr]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sel = selectors.DefaultSelector()
        sel.register(server.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=15), "the transfer server did not start"
        port = server.stdout.readline().strip()
        client = subprocess.run(
            netbed.netns_command(
                src_ns, [sys.executable, "-c", CLIENT, dst_addr, port, str(nbytes)]
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        seconds, received = client.stdout.split()
        assert int(received) == nbytes
        return nbytes * 8 / float(seconds) / 1e6
    finally:
        server.kill()
        server.wait()


def _cgroup_of(pid: int, mount: Path) -> set[str]:
    """The cpu cgroup (as an absolute directory) of every thread of *pid*."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                found.add(str(mount / path.lstrip("/")))
    return found


def _tbf_rates(ns: str) -> dict[str, int]:
    """Device -> tbf rate in bit/s, from ``tc -j qdisc show`` inside *ns*."""
    out = subprocess.run(
        ["tc", "-j", "-n", ns, "qdisc", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {q["dev"]: q["options"]["rate"] * 8 for q in json.loads(out) if q["kind"] == "tbf"}


def test_phone_testbed_shapes_throttles_meshes_and_cleans_up(tmp_path):
    root = tmp_path / "tb"
    profile_path = tmp_path / "phones3.toml"
    profile_path.write_text(PROFILE)
    mount = netbed.check_host()
    # Deterministic per directory: the same names testbed.up creates, so the `finally` can
    # remove them even if up or down breaks half-way.
    net = netbed.plan(root, testbed_profile.load_profile(profile_path), cpu_mount=mount)
    peers: list[testbed.TestbedPeer] = []
    try:
        peers = testbed.up(root, profile=profile_path)
        assert [p.device_class for p in peers] == ["flagship", "midrange", "budget"]
        state = json.loads((root / "testbed.json").read_text())
        assert netbed.Netbed.from_json(state["network"]) == net
        assert set(state["profile"]["classes"]) == {"flagship", "midrange", "budget"}

        # --- the kernel's side: namespaces, qdiscs, cgroups ----------------------------------
        present = netbed.list_netns()
        assert {net.hub_netns, *(p.netns for p in net.peers)} <= present
        hub_rates = _tbf_rates(net.hub_netns)
        for tp, np in zip(peers, net.peers, strict=True):
            rate = int(np.bandwidth_mbit * 1e6)
            assert _tbf_rates(np.netns) == {np.veth_peer: rate}  # upload
            assert hub_rates[np.veth_hub] == rate  # download
            cg = Path(np.cgroup)
            expected = -1 if np.cpu >= cgroups.host_cpus() else round(np.cpu * CFS_PERIOD_US)
            assert int((cg / "cpu.cfs_quota_us").read_text()) == expected
            assert int((cg / "cpu.cfs_period_us").read_text()) == CFS_PERIOD_US
            # Every thread of the daemon is in its peer's cgroup and network namespace.
            assert testbed.is_our_daemon(tp.pid)
            assert _cgroup_of(tp.pid, mount) == {np.cgroup}
            assert tp.pid in {int(x) for x in (cg / "cgroup.procs").read_text().split()}
            assert (
                os.stat(f"/proc/{tp.pid}/ns/net").st_ino
                == (netbed.NETNS_DIR / np.netns).stat().st_ino
            )
            # ... and in its memory cgroup, capped at its class's memory with no swap.
            mem = Path(np.memory_cgroup)
            assert int((mem / "memory.limit_in_bytes").read_text()) == np.memory_mb << 20
            assert tp.pid in {int(x) for x in (mem / "cgroup.procs").read_text().split()}
            if netbed.find_tool("nsenter"):  # no private /sys: it can read its own quota
                quota = Path(f"/proc/{tp.pid}/root{np.cgroup}/cpu.cfs_quota_us").read_text()
                assert int(quota) == expected

        # --- one mesh, over the namespace addresses only ---------------------------------------
        views = [call(Path(p.home), "status", timeout=5) for p in peers]
        ids = sorted(v["self"]["id"] for v in views)
        assert all(sorted(v["members"]) == ids for v in views)
        assert len({v["leader"] for v in views}) == 1 and views[0]["leader"] in ids
        for v, np in zip(views, net.peers, strict=True):
            assert v["self"]["addrs"] and all(
                a.startswith(f"/ip4/{np.address}/tcp/") for a in v["self"]["addrs"]
            ), v["self"]["addrs"]
            others = [a for p in v["peers"] for a in p["addrs"]]
            assert others and all(a.startswith("/ip4/10.213.") for a in others), others
            assert not any("127.0.0.1" in a for a in [*v["self"]["addrs"], *others])
        for np in net.peers:
            cfg = (root / f"peer-{np.index}" / "config.toml").read_text()
            assert f"memory_limit_mb = {np.memory_mb}" in cfg

        # --- the links run at the class rates, both directions ---------------------------------
        flag, mid, budget = net.peers
        loopback = transfer_mbit(flag.netns, flag.netns, "127.0.0.1", 10 * NBYTES)
        # (source, destination, the class rate that must limit it)
        paths = {
            "flagship->midrange (midrange download)": (flag, mid, 50),
            "midrange->flagship (midrange upload)": (mid, flag, 50),
            "flagship->budget (budget download)": (flag, budget, 20),
            "budget->flagship (budget upload)": (budget, flag, 20),
        }
        measured = {
            what: (transfer_mbit(src.netns, dst.netns, dst.address), rate)
            for what, (src, dst, rate) in paths.items()
        }
        report = "; ".join(f"{k}: {v:.1f} of {r} Mbit/s" for k, (v, r) in measured.items())
        print(f"\nunshaped loopback {loopback:.0f} Mbit/s; {report}")
        for what, (mbit, rate) in measured.items():
            assert 0.5 * rate <= mbit <= 1.3 * rate, f"{what}: {mbit:.1f} Mbit/s, class {rate}"
            assert mbit < loopback / 5, (what, mbit, loopback)

        # --- the CPU quota throttles what runs in the peer's cgroup ------------------------------
        share = float(
            subprocess.run(
                netbed.peer_command(budget, [sys.executable, "-c", BURN]),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        )
        print(f"budget peer (0.25 cpu): a busy loop got {share:.2f} of a core")
        assert 0.15 <= share <= 0.35, share
        quota = netbed.set_cpu_quota(budget, 0.5)  # what `testbed throttle` will do
        half = round(0.5 * CFS_PERIOD_US)
        assert quota == half
        assert (Path(budget.cgroup) / "cpu.cfs_quota_us").read_text().strip() == str(half)

        # --- the memory cap kills what goes over it, as a phone's low-memory killer would ------
        hog = subprocess.run(
            netbed.peer_command(budget, [sys.executable, "-c", HOG % (budget.memory_mb + 64)]),
            capture_output=True,
            timeout=60,
        )
        assert hog.returncode == -signal.SIGKILL, (hog.returncode, hog.stderr[-300:])
        entries = {e["index"]: e for e in testbed.status(root)}
        for np in net.peers:
            e = entries[np.index]
            assert e["memory_limit_bytes"] == np.memory_mb << 20
            assert 0 < e["memory_peak_bytes"] <= e["memory_limit_bytes"]
            assert e["oom_kills"] == (1 if np is budget else 0), e
        assert testbed.is_our_daemon(peers[budget.index].pid)  # the hog went, not the daemon
        shown = cli(None, "testbed", "status", "--dir", str(root), "--json")
        assert json.loads(shown.stdout)[budget.index]["oom_kills"] == 1

        # --- down removes every namespace, link, cgroup and daemon -----------------------------
        assert testbed.down(root) == len(peers)
        assert not any(testbed.is_our_daemon(p.pid) for p in peers)
        assert not {net.hub_netns, *(p.netns for p in net.peers)} & netbed.list_netns()
        assert netbed.leftovers(net) == []
        assert not Path(net.cgroup_dir).exists() and not Path(net.memory_cgroup_dir).exists()
        assert not (root / "testbed.json").exists()
        assert testbed.down(root) == 0  # idempotent
    finally:
        with contextlib.suppress(Exception):
            testbed.down(root)
        with contextlib.suppress(Exception):
            netbed.teardown(net)
        for p in peers:
            with contextlib.suppress(ProcessLookupError):
                if testbed.is_our_daemon(p.pid):
                    os.kill(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("fail_at", ["create", "second peer"])
def test_a_half_built_testbed_is_removed_completely(tmp_path, monkeypatch, fail_at):
    """up fails half-way (in the network plumbing, or after a daemon started): nothing stays."""
    root = tmp_path / "tb"
    profile_path = tmp_path / "phones3.toml"
    profile_path.write_text(PROFILE)
    prof = testbed_profile.load_profile(profile_path)
    net = netbed.plan(root, prof, cpu_mount=netbed.check_host())
    started: list[int] = []
    real_start = testbed.start_daemon

    def start_daemon(*args, **kwargs):
        proc = real_start(*args, **kwargs)
        started.append(proc.pid)
        return proc

    def broken(*_args, **_kwargs):
        raise testbed.TestbedError("injected failure")

    real_tbf, real_config = netbed._tbf, testbed.set_peer_config

    def tbf(ns: str, dev: str, mbit: float) -> None:
        if dev == net.peers[1].veth_hub:
            broken()
        real_tbf(ns, dev, mbit)

    def set_peer_config(home: Path, **kwargs) -> None:
        if home.name == "peer-1":
            broken()
        real_config(home, **kwargs)

    if fail_at == "create":
        monkeypatch.setattr(netbed, "_tbf", tbf)
    else:
        monkeypatch.setattr(testbed, "set_peer_config", set_peer_config)
    monkeypatch.setattr(testbed, "start_daemon", start_daemon)
    try:
        with pytest.raises(testbed.TestbedError, match="injected failure"):
            testbed.up(root, profile=profile_path)
        assert len(started) == (0 if fail_at == "create" else 1)
        assert netbed.leftovers(net) == []
        assert not any(testbed.is_our_daemon(pid) for pid in started)
        assert not (root / "testbed.json").exists()
        netbed.teardown(net)  # idempotent: nothing left to remove is no error
    finally:
        with contextlib.suppress(Exception):
            netbed.teardown(net)


def test_teardown_removes_stray_processes_and_what_exists_of_the_network(tmp_path):
    profile_path = tmp_path / "phones3.toml"
    profile_path.write_text(PROFILE)
    prof = testbed_profile.load_profile(profile_path)
    net = netbed.plan(tmp_path, prof, cpu_mount=netbed.check_host())
    try:
        netbed.create(net)
        # A process left inside a peer would keep its namespace alive and its cgroup busy.
        stray = subprocess.Popen(netbed.peer_command(net.peers[2], ["sleep", "60"]))
        procs = Path(net.peers[2].cgroup) / "cgroup.procs"
        for _ in range(200):  # the wrapper moves itself into the cgroup as its first step
            if str(stray.pid) in procs.read_text().split():
                break
            time.sleep(0.01)
        else:
            pytest.fail("the stray process never joined its cgroup")
        # Half of it already gone by hand: teardown removes what is left, quietly.
        subprocess.run(["ip", "netns", "del", net.peers[0].netns], check=True)
        netbed.teardown(net)
        # Killed, and already reaped by teardown (a zombie would have kept the cgroup busy).
        assert not Path(f"/proc/{stray.pid}").exists()
        stray.wait(timeout=5)
        assert netbed.leftovers(net) == []
    finally:
        with contextlib.suppress(Exception):
            netbed.teardown(net)
