"""A local testbed: N daemons as separate processes on 127.0.0.1, joined by one secret.

``testbed.json`` in the testbed directory records every process started, so ``down`` stops
exactly those (checking each pid still runs a meshllm daemon before signalling it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from meshllm.control.client import DaemonNotRunning, call
from meshllm.errors import MeshError
from meshllm.mesh.identity import JoinToken, MeshSecret
from meshllm.mesh.peerstore import add_bootstrap

STATE_FILE = "testbed.json"


class TestbedError(MeshError):
    """The testbed cannot be started, queried or stopped as asked."""


@dataclass(frozen=True)
class TestbedPeer:
    index: int
    home: str
    pid: int


def _state_path(root: Path) -> Path:
    return root / STATE_FILE


def load_state(root: Path) -> list[TestbedPeer]:
    try:
        raw = json.loads(_state_path(root).read_text())
    except FileNotFoundError:
        raise TestbedError(f"no testbed in {root} (start one with `meshllm testbed up`)") from None
    return [TestbedPeer(**p) for p in raw["peers"]]


def _save_state(root: Path, peers: list[TestbedPeer]) -> None:
    _state_path(root).write_text(json.dumps({"peers": [asdict(p) for p in peers]}, indent=2))


def _is_our_daemon(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"meshllm" in b" ".join(cmdline) and b"daemon" in cmdline


def start_daemon(home: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    log = (home / "daemon.log").open("ab")
    env = dict(os.environ, **(extra_env or {}))
    env.pop("MESHLLM_HOME", None)
    return subprocess.Popen(
        [sys.executable, "-m", "meshllm", "--home", str(home), "daemon"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )  # fmt: skip


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


def up(root: Path, n: int, *, report=lambda _m: None) -> list[TestbedPeer]:
    from meshllm.commands.peer import init_home

    if n < 1:
        raise TestbedError("a testbed needs at least one peer")
    if _state_path(root).exists() and any(_is_our_daemon(p.pid) for p in load_state(root)):
        raise TestbedError(f"a testbed is already running in {root}: `meshllm testbed down` first")
    root.mkdir(parents=True, exist_ok=True)
    peers: list[TestbedPeer] = []
    token: JoinToken | None = None
    secret: MeshSecret | None = None
    try:
        for i in range(n):
            home = root / f"peer-{i}"
            if not init_home(home, name=f"peer-{i}", token=token) and token is not None:
                add_bootstrap(home, list(token.addrs))  # a re-used home: ports are new
            if secret is None:
                secret = MeshSecret.load(home)
            proc = start_daemon(home)
            peers.append(TestbedPeer(i, str(home), proc.pid))
            _save_state(root, peers)
            status = wait_ready(home, proc)
            # Each peer joins through the previous one: the mesh forms from a single chain.
            token = JoinToken(secret, tuple(status["self"]["addrs"]))
            report(f"peer-{i} up: {status['self']['id']} pid {proc.pid}")
        _wait_for_mesh([Path(p.home) for p in peers], timeout=30)
    except BaseException:
        down(root)
        raise
    return peers


def _wait_for_mesh(homes: list[Path], timeout: float) -> None:
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


def status(root: Path) -> list[dict]:
    out = []
    for p in load_state(root):
        entry: dict = {"index": p.index, "home": p.home, "pid": p.pid}
        try:
            entry["status"] = call(Path(p.home), "status", timeout=5)
        except MeshError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def down(root: Path, grace: float = 5.0) -> int:
    """Stop every daemon this testbed started; returns how many were running."""
    try:
        peers = load_state(root)
    except TestbedError:
        return 0
    running = [p for p in peers if _is_our_daemon(p.pid)]
    for p in running:
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in running:
        while _is_our_daemon(p.pid) and time.monotonic() < deadline:
            _reap(p.pid)
            time.sleep(0.05)
        if _is_our_daemon(p.pid):
            os.kill(p.pid, signal.SIGKILL)
        _reap(p.pid)
    _state_path(root).unlink(missing_ok=True)
    return len(running)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
