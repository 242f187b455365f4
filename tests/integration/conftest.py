"""Fixtures for tests that run real daemons on loopback.

``mesh(n)`` starts *n* testbed daemons (a real mesh: libp2p, admission, election) and stops
them when its ``with`` block ends, so module-scoped fixtures can hold one mesh per parameter
and let it go before the next:

    with mesh(3) as m:
        m.give_model(model, at=0)
        m.serve(model, "--partitioner", "even")
        ...
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshllm import testbed
from meshllm.model.store import ImportedModel
from tests.integration.mesh_helpers import cli, link_model, running, status, wait_for


class Mesh:
    """A running testbed mesh: its peers' homes, in the order they were started."""

    def __init__(self, root: Path, peers: list[testbed.TestbedPeer]):
        self.root = root
        self.peers = peers
        self.homes = [Path(p.home) for p in peers]

    def status(self, i: int) -> dict:
        st = status(self.homes[i])
        assert st is not None, f"peer {i} answers no status"
        return st

    def restart(self, i: int, args: tuple[str, ...] = (), *, rejoin: bool = True) -> int:
        """Stop peer *i* and start its daemon again (with *args*); its new pid. With
        *rejoin*, returns once every peer sees the mesh whole again."""
        home = self.homes[i]
        cli(home, "stop")
        wait_for(lambda: not running(self.peers[i].pid), timeout=10)
        proc = testbed.start_daemon(home, args=args)
        testbed.wait_ready(home, proc)
        self.peers[i] = testbed.TestbedPeer(i, str(home), proc.pid)
        testbed.save_state(self.root, self.peers)
        if rejoin:
            testbed.wait_for_mesh(self.homes, timeout=30)
        return proc.pid

    def give_model(self, model: ImportedModel, at: int = 0, *, restart: bool = True) -> None:
        """Make peer *at* the model's source (hard links of an imported model). With
        *restart* it advertises the model at once; without, within seconds (serve retries)."""
        link_model(model, self.homes[at])
        if restart:
            self.restart(at)

    def serve(
        self, model: ImportedModel, *args: str, at: int = -1, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """``meshllm serve`` from peer *at*; waits for every stage to be ready (on a clean
        checkout that includes cutting segments, hence the long default)."""
        return cli(
            self.homes[at],
            "serve",
            model.name,
            *args,
            "--timeout",
            str(int(timeout)),
            timeout=timeout + 30,
        )


MeshFactory = Callable[..., contextlib.AbstractContextManager[Mesh]]


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> MeshFactory:
    """``with mesh(n, **options) as m``: *n* daemons that have formed one mesh, stopped
    afterwards (*options* as ``testbed.up``'s: config, transport, profile)."""

    @contextlib.contextmanager
    def start(n: int, **options: Any) -> Iterator[Mesh]:
        root = tmp_path_factory.mktemp(f"mesh{n}-")
        try:
            yield Mesh(root, testbed.up(root, n, **options))
        finally:
            testbed.down(root)

    return start
