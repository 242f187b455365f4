"""Helpers for tests that run real daemon processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshllm import testbed
from meshllm.control.client import call
from meshllm.errors import MeshError
from meshllm.mesh.identity import MeshSecret


def cli(home: Path | None, *args: str, check: bool = True, timeout: float = 30):
    env = dict(os.environ)
    env.pop("MESHLLM_HOME", None)
    cmd = [sys.executable, "-m", "meshllm"]
    if home is not None:
        cmd += ["--home", str(home)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"meshllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def status(home: Path) -> dict[str, Any] | None:
    """What `meshllm status --json` prints, straight from the control socket (no process
    start-up per poll, so timings measure the mesh, not Python's start-up), or None."""
    try:
        return call(home, "status", timeout=5)
    except MeshError:
        return None


def cli_status(home: Path) -> dict[str, Any]:
    return json.loads(cli(home, "status", "--json").stdout)


def agreement(homes: list[Path]) -> tuple[list[str], str] | None:
    """(members, leader) when every peer reports the same members and the same one leader."""
    views = [status(h) for h in homes]
    if any(v is None for v in views):
        return None
    members = {tuple(v["members"]) for v in views}
    leaders = {v["leader"] for v in views}
    if len(members) != 1 or len(leaders) != 1 or None in leaders:
        return None
    (m,) = members
    (leader,) = leaders
    if len(m) != len(homes) or leader not in m:
        return None
    return list(m), leader


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll *predicate* (processes in other address spaces cannot signal us) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def _phones_unavailable() -> str | None:
    from meshllm import netbed
    from meshllm.testbed import TestbedError

    try:
        netbed.check_host()
    except TestbedError as exc:
        return str(exc)
    return None


_PHONES_PROBLEM = _phones_unavailable()
# Emulated phones need root and the kernel's cgroup v1 CPU controller, which no package can
# provide; iproute2 is installed by tools/setup.sh. Without them these tests cannot run.
needs_phones = pytest.mark.skipif(
    _PHONES_PROBLEM is not None,
    reason=f"emulated phones need root, iproute2 and cgroup v1 here: {_PHONES_PROBLEM}",
)

# Three phones (a flagship, a midrange, a budget phone) for the tests that need a testbed.
PHONES3 = """
[class.flagship]
cpu = 1.0
bandwidth_mbit = 200
memory_mb = 1024

[class.midrange]
cpu = 0.5
bandwidth_mbit = 50
memory_mb = 640

[class.budget]
cpu = 0.25
bandwidth_mbit = 20
memory_mb = 384

[[peer]]
class = "flagship"

[[peer]]
class = "midrange"

[[peer]]
class = "budget"
"""


# -- a mesh of real daemons serving a real model ------------------------------------------------
MAX_TOKENS = 24


def monolithic(model, prompt: str, max_tokens: int = MAX_TOKENS, timeout: float = 120) -> list[int]:
    """The oracle: greedy token ids of the whole model in one process."""
    home = model.path.parent.parent
    out = cli(
        home,
        "generate",
        "--model",
        model.name,
        prompt,
        "--max-tokens",
        str(max_tokens),
        "--monolithic",
        "--json",
        "--threads",
        "1",
        timeout=timeout,
    )
    return json.loads(out.stdout)["token_ids"]


def link_model(model, home: Path) -> None:
    """Give the source peer the imported model (hard links: no copy, no conversion)."""
    dest = home / "models" / model.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        model.path, dest, copy_function=os.link, ignore=shutil.ignore_patterns("segments", "*.lock")
    )


def query(home: Path, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    out = cli(home, "query", prompt, "--max-tokens", str(max_tokens), "--json", timeout=300)
    return json.loads(out.stdout)


def restart(root: Path, peers, index: int) -> None:
    """Stop testbed peer *index* and start its daemon again."""
    home = Path(peers[index].home)
    cli(home, "stop")
    proc = testbed.start_daemon(home)
    testbed.wait_ready(home, proc)
    peers[index] = testbed.TestbedPeer(index, str(home), proc.pid)
    testbed.save_state(root, peers)


# -- processes ----------------------------------------------------------------------------------
def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports *pid* listens on, from /proc (its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class PnetOnly(MeshSecret):
    """Holds a stolen private-network key but a random auth key: `pnet_key` and `auth_key`
    are independent derivations of the raw secret, so one can be had without the other."""

    stolen_pnet: bytes = b""

    @property
    def pnet_key(self) -> bytes:
        return self.stolen_pnet
