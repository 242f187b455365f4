"""Hostile peers against real daemons (issue 19): nothing a peer sends stops a daemon.

Two daemons on loopback serve the tiny model. A hostile peer built in this process, exactly as
a daemon builds its endpoint and holding the mesh secret (so it is admitted), sends generated
hostile CBOR (tests/hostile_values.py: bignums, decimal fractions, NaN and infinities, NUL and
path characters, lengths past the payload, deep nesting, unknown tags, wrong types, truncated
and bit-flipped encodings) on every protocol a daemon serves: control messages (heartbeats
with hostile plans and serving state, vote messages, application messages), activation frames
(over libp2p and over the encrypted data plane), file, KV, probe and data-plane requests, and
frames cut short or reset. An outsider without the secret connects to both ports, sends a few
bytes and resets, many times.

The hostile peer is also asked things: it serves any file (honest bytes under a hostile
header, or our bytes where a victim would take a path from a hostile model hash), answers
probes, and takes the error frames its activation frames earn.

Payloads go to the two daemons in turn. Every few payloads a ping (a vote request, or a frame
for no open request) that the victim answers only after the ones before proves they were
handled, so a failure names the few payloads since the last answered ping. After each batch,
both daemons still run, answer on their control sockets, and a greedy query gives exactly the
monolithic model's tokens; nothing was written outside the daemons' homes; and no link to a
victim wedged (stopped carrying anything while the daemon runs; we reconnect and go on, and
the batch fails at its end). A failure names the batch, the protocol and the payloads sent to
the daemon that failed (kind and hex), with the end of its log.

Seeded ``random`` rather than hypothesis: each case costs a round trip to a real process, and a
fixed seed keeps a failure reproducible. The counts are fixed (not a time budget).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import onnx
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from meshllm import testbed
from meshllm.control.client import RequestFailed, call
from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameReader, frame
from meshllm.mesh.identity import MeshSecret
from meshllm.mesh.p2p import AUTH_PROTOCOL, CTL_PROTOCOL, DATAPLANE_PROTOCOL, Libp2pEndpoint
from meshllm.mesh.transport import EndpointOptions, PeerUnreachable, Stream
from meshllm.model.ranges import LayerRange
from meshllm.model.store import ImportedModel
from tests import hostile_values as hv
from tests.integration.mesh_helpers import PnetOnly, cli, listening_tcp_ports, running, status

SEED = 19
PROMPT = "hello world"
MAX_TOKENS = 8
HANDSHAKE_S = 2.0  # the daemons' [mesh] handshake_timeout_s (the default)
SEND_S = 10.0  # one case's send (and read of the answer): past it, the victim stalled
ANSWER_S = 60.0  # a query after a batch: generous, on a 2-core machine after a flood
PWNED = b"written by a hostile peer\n"
ESCAPED = Path("/tmp/meshllm-escaped")  # where hostile_values' absolute paths point
TAIL_CHARS = 2500


def proto(name: str) -> TProtocol:
    return TProtocol(f"/meshllm/{name}/1.0.0")


# -- the mesh --------------------------------------------------------------------------------


@dataclass
class Mesh:
    root: Path
    peers: list[testbed.TestbedPeer]
    homes: list[Path]
    ids: list[str]
    addrs: list[str]
    plan: dict[str, Any]
    model: ImportedModel
    watched: list[Path] = field(default_factory=list)  # where an escape would land
    baseline: dict[Path, set[str]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.peers)

    def role(self, i: int) -> str:
        stage = next((s for s in self.plan["stages"] if s[0] == self.ids[i]), None)
        what = f"layers {stage[1]}-{stage[2]}" if stage else "no stage"
        source = ", model source" if self.ids[i] == self.plan["source"] else ""
        return f"peer-{i} (pid {self.peers[i].pid}, {what}{source})"

    def stage_of(self, i: int) -> tuple[int, int]:
        _, a, b = next(s for s in self.plan["stages"] if s[0] == self.ids[i])
        return a, b

    def listing(self) -> dict[Path, set[str]]:
        out = {}
        for d in self.watched:
            out[d] = set(os.listdir(d)) if d.is_dir() else set()
        return out


def link_model(model: ImportedModel, home: Path) -> None:
    dest = home / "models" / model.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        model.path, dest, copy_function=os.link, ignore=shutil.ignore_patterns("segments", "*.lock")
    )


def build_mesh(root: Path, model: ImportedModel) -> Mesh:
    peers = testbed.up(root, 2)
    homes = [Path(p.home) for p in peers]
    try:
        link_model(model, homes[0])  # advertised within seconds; serve retries meanwhile
        cli(
            homes[1],
            "serve",
            model.name,
            "--partitioner",
            "even",
            "--balance",
            "none",
            "--timeout",
            "150",
            timeout=180,
        )
        views = [status(h) for h in homes]
        assert all(v is not None for v in views)
        plan = views[0]["serving"]["plan"]  # type: ignore[index]
        mesh = Mesh(
            root,
            peers,
            homes,
            [v["self"]["id"] for v in views],  # type: ignore[index]
            [v["self"]["addrs"][0] for v in views],
            plan,
            model,
        )  # type: ignore[index]
        # The homes' parents, and the absolute target of hostile_values' path strings.
        shutil.rmtree(ESCAPED, ignore_errors=True)
        mesh.watched = [root, root.parent, ESCAPED]
        mesh.baseline = mesh.listing()
        return mesh
    except BaseException:
        testbed.down(root)
        raise


def answer(home: Path, within: float = ANSWER_S) -> dict[str, Any]:
    """A greedy query at *home*; waits on the answer itself (retrying only answers that say
    the mesh is busy or loading) up to *within* seconds."""
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return call(
                home,
                "query",
                timeout=max(1.0, deadline - time.monotonic()),
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
            )
        except RequestFailed as exc:
            if exc.code not in ("not_ready", "busy", "query_failed", "no_leader"):
                raise
            last = exc
        except MeshError as exc:
            last = exc
            break
        time.sleep(0.2)  # another process: there is no event to wait on
    raise AssertionError(f"no answer at {home.name} within {within:g} s: {last}")


def log_tail(home: Path) -> str:
    """The end of a daemon's log: the traceback it ended with, else its last errors."""
    try:
        lines = (home / "daemon.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    end = len(lines)
    while end and not lines[end - 1].startswith("{"):  # JSON log lines; the rest: tracebacks
        end -= 1
    if end < len(lines):
        return "\n".join(lines[end:])[-TAIL_CHARS:]
    bad = [ln for ln in lines if '"level": "error"' in ln or '"exception"' in ln]
    return "\n".join(bad[-6:] or ["(no errors logged)"])[-TAIL_CHARS:]


def trouble(mesh: Mesh, i: int) -> str | None:
    """None if daemon *i* answers on its control socket; else what is wrong with it."""
    if running(mesh.peers[i].pid):
        try:
            call(mesh.homes[i], "status", timeout=20)
            return None
        except MeshError as exc:
            problem = f"stopped answering its control socket ({exc})"
    else:
        return "died"
    deadline = time.monotonic() + 10
    while running(mesh.peers[i].pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # it may be on its way out: say which
    return "died" if not running(mesh.peers[i].pid) else problem


class MeshKeeper:
    """One mesh for the module; rebuilt when a test left it broken (the daemons' fault, the
    test having failed), so each test reports its own protocol's failures."""

    def __init__(self, base: Path, model: ImportedModel, expected: list[int]):
        self.base = base
        self.model = model
        self.expected = expected
        self.mesh: Mesh | None = None
        self.builds = 0

    def healthy(self) -> bool:
        mesh = self.mesh
        if mesh is None or any(trouble(mesh, i) for i in range(mesh.n)):
            return False
        try:
            return answer(mesh.homes[0], within=20)["token_ids"] == self.expected
        except (AssertionError, MeshError):
            return False

    def ready(self) -> Mesh:
        if not self.healthy():
            self.close()
            self.builds += 1
            self.mesh = build_mesh(self.base / f"tb{self.builds}", self.model)
        assert self.mesh is not None
        return self.mesh

    def close(self) -> None:
        if self.mesh is not None:
            testbed.down(self.mesh.root)
            self.mesh = None


@pytest.fixture(scope="module")
def expected(tiny_fp32: ImportedModel) -> list[int]:
    """The monolithic model's greedy tokens for PROMPT."""
    home = tiny_fp32.path.parent.parent
    out = cli(
        home,
        "generate",
        "--model",
        tiny_fp32.name,
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
        "--monolithic",
        "--json",
        "--threads",
        "1",
    )
    return json.loads(out.stdout)["token_ids"]


@pytest.fixture(scope="module")
def keeper(tmp_path_factory, tiny_fp32: ImportedModel, expected: list[int]):  # type: ignore[no-untyped-def]
    k = MeshKeeper(tmp_path_factory.mktemp("hostile"), tiny_fp32, expected)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def mesh(keeper: MeshKeeper) -> Mesh:
    m = keeper.ready()
    m.baseline = m.listing()  # what earlier tests left is theirs to report
    # The baseline: before anything hostile, the mesh gives the monolithic tokens.
    assert answer(m.homes[0])["token_ids"] == keeper.expected
    return m


# -- the hostile peer ------------------------------------------------------------------------


class FileSource:
    """The hostile peer's file server. Any file asked of it is our bytes (so a victim that
    builds a path from a hostile message writes them there), under an honest header unless
    a hostile one is queued for that model hash. Remembers what was asked, by whom."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.hostile: dict[str, hv.Case] = {}  # model sha -> the header to answer with
        self.news = trio.Event()

    async def handle(self, stream: Stream) -> None:
        with suppress(Exception), trio.move_on_after(SEND_S):
            req = cbor2.loads(await FrameReader(stream.read, 1 << 16).read_frame())
            req = req if isinstance(req, dict) else {}
            self.asked.append((stream.peer_id, req))
            self.news.set()
            self.news = trio.Event()
            case = self.hostile.pop(str(req.get("sha"))[:64], None)
            if case is not None:
                await stream.write(frame(case.data) + PWNED)
                return
            sha = hashlib.sha256(PWNED).hexdigest()
            await stream.write(frame(cbor2.dumps({"ok": True, "size": len(PWNED), "sha256": sha})))
            await stream.write(PWNED)

    async def wait_asked(self, sha: str, timeout: float) -> bool:
        """Whether a file of model *sha* was asked for within *timeout* seconds."""
        with trio.move_on_after(timeout):
            while not any(r.get("sha") == sha for _, r in self.asked):
                await self.news.wait()
            return True
        return False


class ActSink:
    """The hostile peer's end of activation links: remembers the request ids of the error
    frames victims send back (a frame we send with ourselves as coordinator and no open
    request gets one, after the frames before it: a ping)."""

    def __init__(self) -> None:
        self.errors: set[str] = set()
        self.news = trio.Event()

    async def handle(self, stream: Stream) -> None:
        with suppress(Exception):
            reader = FrameReader(stream.read, 64 << 20)
            while True:
                msg = cbor2.loads(await reader.read_frame())
                if (
                    isinstance(msg, dict)
                    and msg.get("k") == "err"
                    and isinstance(msg.get("r"), str)
                ):
                    self.errors.add(msg["r"])
                    self.news.set()
                    self.news = trio.Event()

    async def wait_error(self, rid: str, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while rid not in self.errors:
                await self.news.wait()
            return True
        return False


async def _answer_probes(stream: Stream) -> None:
    with suppress(Exception), trio.move_on_after(60):
        reader = FrameReader(stream.read, 1 << 21)
        while True:
            msg = cbor2.loads(await reader.read_frame())
            reply = {"echo": msg["echo"]} if "echo" in msg else {"got": len(msg.get("sink", b""))}
            await stream.write(frame(cbor2.dumps(reply)))


async def _drain(stream: Stream) -> None:
    with suppress(Exception), trio.move_on_after(120):
        while await stream.read(1 << 16):
            pass


PROFILE_MSG = hv.templates()["ctl.app.profile"]
MAX_WEDGES = 3
PING_EVERY = 5  # control messages between two checks that the victim has handled them


class Attacker:
    """The hostile peer: an admitted endpoint in this process, and what it sent."""

    def __init__(self, ep: Libp2pEndpoint, mesh: Mesh, files: FileSource, act: ActSink):
        self.ep = ep
        self.mesh = mesh
        self.files = files
        self.act = act
        # Per victim: the payloads sent since it last proved it had handled what came before.
        self.recent: dict[int, collections.deque[hv.Case]] = {
            i: collections.deque(maxlen=8) for i in range(mesh.n)
        }
        self.count = 0
        self.by_protocol: collections.Counter[str] = collections.Counter()
        self._ctl: dict[int, Any] = {}
        self._unpinged: collections.Counter[int] = collections.Counter()
        self.unanswered: collections.Counter[int] = collections.Counter()
        self.reconnects = 0
        self.barriers = 0
        self.wedges: list[str] = []
        self._pongs: collections.Counter[str] = collections.Counter()
        self._pong = trio.Event()

    async def receive(self) -> None:
        """Control messages the victims send us: vote answers are the pings' replies."""
        async for msg in self.ep.messages:
            with suppress(Exception):
                if cbor2.loads(msg.payload).get("t") == "vres":
                    self._pongs[msg.sender] += 1
                    self._pong.set()
                    self._pong = trio.Event()

    def pid(self, i: int) -> ID:
        return ID.from_base58(self.mesh.ids[i])

    async def ensure_admitted(self, i: int) -> None:
        """Dial victim *i* again if it dropped us (a daemon may close a misbehaving link)."""
        if not self.ep.is_connected(self.mesh.ids[i]):
            with trio.fail_after(HANDSHAKE_S * 3):
                await self.ep.dial(self.mesh.addrs[i])

    async def reconnect(self, i: int) -> None:
        """Drop our connection to victim *i* and dial it again: a daemon may close (or half
        close) a link that sent it something bad, and that is its right."""
        self.reconnects += 1
        self._ctl.pop(i, None)
        with trio.move_on_after(HANDSHAKE_S * 2):
            await self.ep.drop(self.mesh.ids[i])
        await self.ensure_admitted(i)

    async def raw_stream(self, i: int, protocol: TProtocol) -> Any:
        await self.ensure_admitted(i)
        with trio.fail_after(SEND_S):
            return await self.ep._host.new_stream(self.pid(i), [protocol])

    def note(self, i: int, case: hv.Case) -> None:
        self.recent[i].append(case)
        self.count += 1
        self.by_protocol[case.protocol] += 1

    def summary(self) -> str:
        return (
            f"{self.count} cases {dict(self.by_protocol)}; pings unanswered "
            f"{dict(self.unanswered)}, reconnects {self.reconnects}"
        )

    def report(self, i: int, label: str, what: str) -> str:
        sent = "\n".join(f"  {c.short()}" for c in self.recent[i]) or "  (nothing yet)"
        return (
            f"{self.mesh.role(i)} {what} during batch {label!r}; what it was sent last (the "
            f"culprit is among these, oldest first):\n{sent}\n"
            f"--- its daemon.log ---\n{log_tail(self.mesh.homes[i])}"
        )

    async def suspect(self, i: int, label: str, what: str) -> None:
        """Something failed on the way to victim *i*: fail with *what* if it is dead or
        stuck; return if it still answers on its control socket."""
        problem = await trio.to_thread.run_sync(trouble, self.mesh, i)
        if problem is not None:
            raise AssertionError(self.report(i, label, problem))
        if what:
            raise AssertionError(self.report(i, label, what))

    def check_alive(self, i: int, label: str) -> None:
        if not running(self.mesh.peers[i].pid):
            raise AssertionError(self.report(i, label, "died"))

    # -- how each protocol's payloads are sent ----------------------------------------------
    async def _write_ctl(self, i: int, data: bytes, label: str) -> None:
        """One frame on the long-lived ctl stream (reopened, then reconnected, if the victim
        reset it or dropped us)."""
        for attempt in range(3):
            try:
                if attempt == 2:
                    await self.reconnect_or_fail(i, label)
                if i not in self._ctl:
                    self._ctl[i] = await self.raw_stream(i, CTL_PROTOCOL)
                with trio.fail_after(SEND_S):
                    await self._ctl[i].write(frame(data))
                return
            except AssertionError:
                raise
            except Exception as exc:
                self._ctl.pop(i, None)
                if attempt == 2:
                    await self.suspect(i, label, f"refused control streams ({exc!r})")

    async def _pinged(self, i: int, label: str) -> bool:
        before = self._pongs[self.mesh.ids[i]]
        await self._write_ctl(i, hv.encode(hv.templates()["ctl.vreq"]), label)
        with trio.move_on_after(SEND_S):
            while self._pongs[self.mesh.ids[i]] <= before:
                await self._pong.wait()
            return True
        return False

    async def ping(self, i: int, label: str) -> None:
        """Wait until victim *i* has handled every control message sent so far: it answers
        a vote request (term 0: it grants nothing) in order, after the others. If it does
        not, but runs and answers its control socket, our link to it may be wedged: that is
        noted (see wedged) and we reconnect. A victim that ignores us even then is let be
        (the checks after the batch judge it); after two such, it is not asked again."""
        if self.unanswered[i] >= 2:
            return
        if await self._pinged(i, label):
            self.recent[i].clear()
            return
        await self.suspect(i, label, "")
        await self.wedged(
            i,
            label,
            f"stopped answering on our link (no vote answer in {SEND_S:g} s), though it runs",
        )
        if await self._pinged(i, label):
            self.recent[i].clear()
            return
        self.unanswered[i] += 1

    async def wedged(self, i: int, label: str, what: str) -> None:
        """Our link to victim *i* stopped carrying anything while the daemon itself runs
        and answers: noted (the test fails at the end of the batch, naming the payloads
        sent before), then we reconnect and go on, so one wedge does not hide what else
        the batch finds. Three wedges end the test at once."""
        self.wedges.append(self.report(i, label, what))
        if len(self.wedges) >= MAX_WEDGES:
            self.assert_no_wedges()
        await self.reconnect_or_fail(i, label)

    async def reconnect_or_fail(self, i: int, label: str) -> None:
        try:
            with trio.fail_after(HANDSHAKE_S * 4):
                await self.reconnect(i)
        except Exception as exc:
            await self.suspect(i, label, f"refused our connection after that ({exc!r})")

    def assert_no_wedges(self) -> None:
        if self.wedges:
            raise AssertionError(
                f"{len(self.wedges)} link(s) to a victim wedged:\n" + "\n\n".join(self.wedges)
            )

    async def send_ctl(self, i: int, case: hv.Case, label: str) -> None:
        self.note(i, case)
        await self._write_ctl(i, case.data, label)
        self._unpinged[i] += 1
        if self._unpinged[i] >= PING_EVERY:
            self._unpinged[i] = 0
            await self.ping(i, label)

    async def exchange(
        self,
        i: int,
        protocol: TProtocol,
        data: bytes,
        case: hv.Case,
        label: str,
        *,
        reset: bool = False,
    ) -> bytes:
        """A stream per request: write *data*, end our side (or reset the stream), and read
        until the victim ends the stream."""
        self.note(i, case)
        got = b""
        try:
            stream = await self.raw_stream(i, protocol)
        except Exception as exc:
            stream, hung = None, isinstance(exc, trio.TooSlowError)
        if stream is None:
            if hung:
                await self.suspect(i, label, "")
                await self.wedged(
                    i,
                    label,
                    f"stopped opening streams on our link (none in {SEND_S:g} s), though it runs",
                )
            else:  # refused: the victim may have closed our link; dial again
                await self.reconnect_or_fail(i, label)
            try:
                stream = await self.raw_stream(i, protocol)
            except Exception as exc:
                await self.suspect(i, label, f"refused new streams, even reconnected ({exc!r})")
                return b""
        try:
            with trio.fail_after(SEND_S):
                await stream.write(data)
                if reset:
                    await stream.reset()
                    return b""
                await stream.close_write()
                while chunk := await stream.read(1 << 16):
                    got += chunk
        except trio.TooSlowError:
            await self.suspect(
                i, label, f"stalled: the stream did not end {SEND_S:g} s after the request"
            )
        except Exception:
            pass  # the end of the stream, or a reset: the victim's choice
        finally:
            with suppress(Exception):
                await stream.reset()
        self.check_alive(i, label)
        return got

    async def profile_barrier(self, label: str) -> None:
        """Profiling runs in the background, one request at a time: ask each victim to
        profile itself for a model only we have (a valid request in every way) and wait
        until it fetches a file of it from us; it is then done with the requests before.
        A daemon that never fetches from us wrote nothing of ours either."""
        for i in range(self.mesh.n):
            self.barriers += 1
            sha = f"{0xBA0000 + self.barriers:064x}"
            body = {"kind": "profile", "sha": sha, "source": self.ep.peer_id, "refresh": True}
            await self._write_ctl(i, hv.encode({**PROFILE_MSG, "body": body}), label)
            await self.files.wait_asked(sha, ANSWER_S)

    async def close_ctl(self) -> None:
        for s in self._ctl.values():
            with suppress(Exception):
                await s.close()
        self._ctl.clear()


@asynccontextmanager
async def attacker(mesh: Mesh) -> AsyncIterator[Attacker]:
    ep = Libp2pEndpoint(
        EndpointOptions(
            key_seed=secrets.token_bytes(32),
            secret=MeshSecret.load(mesh.homes[0]),
            listen=("/ip4/127.0.0.1/tcp/0",),
            handshake_timeout_s=HANDSHAKE_S,
        )
    )
    files, act = FileSource(), ActSink()
    ep.set_stream_handler("files", files.handle)
    ep.set_stream_handler("probe", _answer_probes)
    ep.set_stream_handler("act", act.handle)
    ep.set_stream_handler("kv", _drain)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(ep.run)
        a = Attacker(ep, mesh, files, act)
        nursery.start_soon(a.receive)
        for i in range(mesh.n):
            await a.ensure_admitted(i)
        try:
            yield a
        finally:
            await a.close_ctl()
            nursery.cancel_scope.cancel()


def context(mesh: Mesh, me: Libp2pEndpoint) -> hv.Context:
    plan = mesh.plan
    return hv.Context(
        peers=tuple(s[0] for s in plan["stages"]),
        me=me.peer_id,
        source=plan["source"],
        model=plan["model"],
        model_sha=plan["model_sha"],
        num_layers=plan["num_layers"],
        epoch=plan["epoch"],
        addr=me.listen_addrs()[0],
    )


async def check(a: Attacker, label: str, expected: list[int], batch: int) -> None:
    """After a batch: every daemon runs and answers, a query gives the monolithic tokens,
    and nothing appeared outside the homes."""
    mesh = a.mesh
    for i in range(mesh.n):
        problem = await trio.to_thread.run_sync(trouble, mesh, i)
        if problem is not None:
            raise AssertionError(a.report(i, label, problem))
    coordinator = batch % mesh.n  # each daemon coordinates in turn
    try:
        got = await trio.to_thread.run_sync(lambda: answer(mesh.homes[coordinator]))
    except (AssertionError, MeshError) as exc:
        stalled = [i for i in range(mesh.n) if running(mesh.peers[i].pid)]
        detail = "\n".join(a.report(i, label, "was in the mesh") for i in stalled)
        raise AssertionError(f"no answer after batch {label!r}: {exc}\n{detail}") from None
    assert got["token_ids"] == expected, (
        f"after batch {label!r} peer-{coordinator} answered {got['token_ids']}, the monolithic "
        f"model {expected}\n" + "\n".join(a.report(i, label, "was sent") for i in range(mesh.n))
    )
    now = mesh.listing()
    for d, before in mesh.baseline.items():
        new = sorted(now[d] - before)
        assert not new, f"after batch {label!r} a hostile path escaped: new {new} in {d}"


# -- batches -------------------------------------------------------------------------------------


@dataclass
class Batch:
    label: str
    cases: list[tuple[int, hv.Case]]  # (victim, case)


def batches_of(
    label: str,
    template_of: Callable[[int], dict[str, Any]],
    protocol: str,
    n: int,
    rng: random.Random,
    victims: int,
    *,
    size: int = 150,
    fixed: tuple[str, ...] = (),
) -> list[Batch]:
    """*n* cases of *protocol* (hostile_values.hostile_cases: a sweep of every field, then
    random mutations), to the victims in turn, in batches of at most *size*. The sweep is
    shared out: case k goes to victim k % victims, made from that victim's template."""
    made = [
        list(hv.hostile_cases(rng, template_of(v), n, protocol=protocol, fixed=fixed))
        for v in range(victims)
    ]
    cases = [(k % victims, made[k % victims][k]) for k in range(n)]
    return [Batch(f"{label} #{j // size + 1}", cases[j : j + size]) for j in range(0, n, size)]


Settle = Callable[[Batch], Awaitable[None]]


async def run_batches(
    a: Attacker,
    batches: list[Batch],
    send: Callable[..., Any],
    expected: list[int],
    settle: Settle | None = None,
) -> None:
    """Send each batch, then check the mesh (after *settle*, which waits for the victims to
    have acted on the batch where that happens in the background)."""
    for k, b in enumerate(batches):
        for victim, case in b.cases:
            await send(victim, case, b.label)
        if settle is not None:
            await settle(b)
        await check(a, b.label, expected, k)
        a.assert_no_wedges()


# -- the tests ---------------------------------------------------------------------------------


def stage_inputs(model: ImportedModel, start: int, stop: int) -> dict[str, list[Any]]:
    """The data tensors a stage of layers [start, stop) takes, encoded as frames carry them
    (one decode step: batch 1, one new token), with harmless values."""
    ((seg, _info),) = model.segment_files([LayerRange(start, stop)])
    graph = onnx.load(str(seg.parent / "segment.onnx"), load_external_data=False).graph
    tp = onnx.TensorProto
    dtypes = {
        tp.INT64: ("int64", 8),
        tp.FLOAT: ("float32", 4),
        tp.FLOAT16: ("float16", 2),
        tp.INT32: ("int32", 4),
    }
    out = {}
    for inp in graph.input:
        if inp.name == "attention_mask" or "past_key_values" in inp.name or "past" in inp.name:
            continue
        tt = inp.type.tensor_type
        name, size = dtypes[tt.elem_type]
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        count = 1
        for d in shape:
            count *= d
        data = struct.pack("<q", 1) * count if name == "int64" else b"\0" * (size * count)
        out[inp.name] = [name, shape, data]
    return out


async def test_hostile_heartbeats(mesh: Mesh, expected: list[int]) -> None:
    """Heartbeats with one field (serving state included) hostile, dropped or added to."""
    rng = random.Random(SEED)
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        batches = batches_of("ctl.hb", lambda _v: t["ctl.hb"], "ctl.hb", 600, rng, mesh.n)
        await run_batches(a, batches, a.send_ctl, expected)
        print(f"\nheartbeats: {a.summary()}")


async def test_heartbeats_carrying_hostile_plans(mesh: Mesh, expected: list[int]) -> None:
    """Heartbeats from a peer that is not the leader, carrying a newer plan (or staged plan)
    with one field hostile; its source is the hostile peer, which serves any file."""
    rng = random.Random(SEED + 10)
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        newer = {**t["plan"], "epoch": mesh.plan["epoch"] + 1000, "source": a.ep.peer_id}

        def hb_with_plan(case: hv.Case) -> hv.Case:
            msg = hv.templates(context(mesh, a.ep))["ctl.hb"]
            key = "staged" if rng.randrange(4) == 0 else "plan"
            msg["x"][key] = hv.Raw(case.data)
            return hv.Case(f"x.{key}:{case.kind}", hv.encode(msg), "ctl.hb.plan")

        plans = hv.hostile_cases(rng, newer, 300, fixed=("epoch",))
        cases = [(k % mesh.n, hb_with_plan(c)) for k, c in enumerate(plans)]
        batches = [Batch("ctl.hb.plan #1", cases[:150]), Batch("ctl.hb.plan #2", cases[150:])]
        await run_batches(a, batches, a.send_ctl, expected)
        print(f"\nheartbeat plans: {a.summary()}")


async def test_hostile_votes(mesh: Mesh, expected: list[int]) -> None:
    rng = random.Random(SEED + 11)
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        batches = [
            *batches_of("ctl.vreq", lambda _v: t["ctl.vreq"], "ctl.vreq", 150, rng, mesh.n),
            *batches_of("ctl.vres", lambda _v: t["ctl.vres"], "ctl.vres", 150, rng, mesh.n),
            *batches_of("ctl.pvreq", lambda _v: t["ctl.pvreq"], "ctl.pvreq", 100, rng, mesh.n),
            *batches_of("ctl.pvres", lambda _v: t["ctl.pvres"], "ctl.pvres", 100, rng, mesh.n),
            *batches_of("ctl.bye", lambda _v: t["ctl.bye"], "ctl.bye", 100, rng, mesh.n),
        ]
        await run_batches(a, batches, a.send_ctl, expected)
        print(f"\nvotes: {a.summary()}")


@pytest.mark.parametrize("kind", ["serve", "profile"])
async def test_hostile_app_messages(mesh: Mesh, expected: list[int], kind: str) -> None:
    """``serve`` (to the leader and a follower) and ``profile`` application messages."""
    rng = random.Random(f"{SEED}-{kind}")
    async with attacker(mesh) as a:
        template = hv.templates(context(mesh, a.ep))[f"ctl.app.{kind}"]
        name = f"ctl.app.{kind}"
        batches = batches_of(name, lambda _v: template, name, 300, rng, mesh.n)

        async def settle(b: Batch) -> None:
            if kind == "profile":  # profiling runs in the background
                await a.profile_barrier(b.label)

        await run_batches(a, batches, a.send_ctl, expected, settle)
        print(f"\napp {kind}: {a.summary()}")


async def test_profile_requests_keep_to_the_home(mesh: Mesh, expected: list[int]) -> None:
    """``profile`` requests whose model hash is a path, naming as the source the hostile
    peer, which serves any file: a victim that built a path from the hash would write our
    bytes outside its home."""
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        escapes = []
        for sha in (*hv.HOSTILE_STRINGS[:16], "../../escaped-profile", str(ESCAPED)):
            body = {"kind": "profile", "sha": sha, "source": a.ep.peer_id, "refresh": True}
            msg = {**t["ctl.app.profile"], "body": body}
            escapes.append(hv.Case(f"profile-path:{sha[:24]!r}", hv.encode(msg), "ctl.app.profile"))

        async def settle(b: Batch) -> None:
            await a.profile_barrier(b.label)

        batch = Batch("profile paths", [(k % mesh.n, c) for k, c in enumerate(escapes)])
        await run_batches(a, [batch], a.send_ctl, expected, settle)
        print(f"\nprofile paths: {a.summary()}")


async def test_hostile_file_answers(mesh: Mesh, expected: list[int]) -> None:
    """The victim as the client: asked to profile itself for a model only the hostile peer
    has, it fetches the model's files from it, and gets a hostile header (a size of
    Infinity, a bignum, a hash that is no hash...), followed by some bytes."""
    rng = random.Random(SEED + 20)
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        sha_of = {}
        cases = []
        for k, case in enumerate(
            hv.hostile_cases(rng, t["files.header"], 150, protocol="files.header")
        ):
            sha_of[id(case)] = f"{0xF00000 + k:064x}"
            cases.append((k % mesh.n, case))

        async def send(i: int, case: hv.Case, label: str) -> None:
            """Ask victim *i* to profile itself for a model of ours; answer its first file
            request with *case*; go on once it has asked."""
            sha = sha_of[id(case)]
            a.files.hostile[sha] = case
            body = {"kind": "profile", "sha": sha, "source": a.ep.peer_id, "refresh": True}
            await a._write_ctl(i, hv.encode({**t["ctl.app.profile"], "body": body}), label)
            a.note(i, case)
            if not await a.files.wait_asked(sha, SEND_S):
                await a.suspect(i, label, "")  # it runs and answers: it may refuse us

        async def settle(b: Batch) -> None:
            await a.profile_barrier(b.label)

        batches = [Batch("files.header #1", cases[:75]), Batch("files.header #2", cases[75:])]
        await run_batches(a, batches, send, expected, settle)
        print(f"\nfile answers: {a.summary()}")


ACT_GROUPS = {
    # A step for no open request (no "cap"), replays, and a first step with a KV source.
    "steps": (("act.fwd", 150), ("act.fwd.replay", 50), ("act.fwd.kv", 50)),
    # A first step (it opens a request, shaped to run; an END follows each).
    "opening": (("act.fwd.open", 200),),
    "returns": (("act.tok", 50), ("act.err", 50), ("act.end", 50)),
}


@pytest.mark.parametrize("group", list(ACT_GROUPS))
@pytest.mark.parametrize("path", ["libp2p", "dataplane"])
async def test_hostile_activation_frames(
    mesh: Mesh, expected: list[int], path: str, group: str
) -> None:
    """Activation frames, shaped for each victim's stage; a frame that may open a request
    is followed by its END, so the hostile requests do not fill the stages."""
    rng = random.Random(f"{SEED}-{path}-{group}")
    async with attacker(mesh) as a:
        base = hv.templates(context(mesh, a.ep))
        per_victim = []
        for i in range(mesh.n):
            t = {k: v for k, v in base.items() if k.startswith("act.")}
            feeds = stage_inputs(mesh.model, *mesh.stage_of(i))
            for k in ("act.fwd", "act.fwd.open", "act.fwd.replay", "act.fwd.kv"):
                t[k] = {**t[k], "t": feeds}
            per_victim.append(t)
        streams: dict[int, Any] = {}
        serial = iter(range(10**9))

        async def stream_to(i: int) -> Any:
            if i not in streams:
                await a.ensure_admitted(i)
                with trio.fail_after(SEND_S):
                    if path == "libp2p":
                        streams[i] = await a.ep._host.new_stream(a.pid(i), [proto("act")])
                    else:
                        s = await a.ep.open_stream(mesh.ids[i], "act")
                        assert type(s).__name__ == "EncryptedStream", "no data plane"
                        streams[i] = s
            return streams[i]

        async def write(i: int, data: bytes, label: str) -> None:
            for attempt in range(3):
                try:
                    if attempt == 2:
                        await a.reconnect_or_fail(i, label)
                    s = await stream_to(i)
                    with trio.fail_after(SEND_S):
                        await s.write(data)
                    return
                except AssertionError:
                    raise
                except Exception as exc:
                    streams.pop(i, None)
                    if attempt == 2:
                        await a.suspect(i, label, f"refused activation frames ({exc!r})")
                    elif isinstance(exc, trio.TooSlowError):  # hung, rather than refused
                        await a.suspect(i, label, "")
                        await a.wedged(
                            i, label, "stopped taking activation frames on our link, though it runs"
                        )

        async def ping(i: int, label: str) -> None:
            """As Attacker.ping: a frame for no open request, coordinated by us, comes back
            as an error once the frames before it were handled."""
            if a.unanswered[i] >= 2:
                return
            rid = f"ping-{next(serial):012d}"
            fwd = {**per_victim[i]["act.fwd"], "r": rid}
            await write(i, frame(hv.encode(fwd)), label)
            if await a.act.wait_error(rid, SEND_S):
                a.recent[i].clear()
                return
            await a.suspect(i, label, "")  # runs and answers: it may ignore us; let it be
            a.unanswered[i] += 1

        sent: collections.Counter[int] = collections.Counter()

        async def send(i: int, case: hv.Case, label: str) -> None:
            data = frame(case.data)
            if case.protocol == "act.fwd.open":  # end the request it may have opened
                rid = f"hostile-{next(serial):09d}"  # as long as the template's rid
                end = {"k": "end", "r": rid, "e": mesh.plan["epoch"], "s": 0, "c": a.ep.peer_id}
                data = frame(case.data.replace(b"hostile-request-1", rid.encode()))
                data += frame(cbor2.dumps(end))
            a.note(i, case)
            await write(i, data, label)
            sent[i] += 1
            if sent[i] % PING_EVERY == 0:
                await ping(i, label)

        batches = []
        for name, n in ACT_GROUPS[group]:
            fixed = ("r", "cap") if name == "act.fwd.open" else ()
            batches += batches_of(
                f"{name} over {path}",
                lambda v, name=name: per_victim[v][name],
                name,
                n,
                rng,
                mesh.n,
                fixed=fixed,
            )
        await run_batches(a, batches, send, expected)
        for s in streams.values():
            with suppress(Exception):
                await s.close()
        print(f"\nactivation frames ({group}) over {path}: {a.summary()}")


@pytest.mark.parametrize("protocol", ["files", "kv", "probe", "dataplane"])
async def test_hostile_stream_requests(mesh: Mesh, expected: list[int], protocol: str) -> None:
    """The first frame of a file, KV, probe or data-plane negotiation stream."""
    rng = random.Random(f"{SEED}-{protocol}")
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        epoch = mesh.plan["epoch"]
        counts = {"files": 150, "kv": 200, "probe": 150, "dataplane": 150}
        if protocol == "files":
            start, stop = mesh.stage_of(0)  # peer-0 is the source: it has the model
            segment = {
                "sha": mesh.plan["model_sha"],
                "what": "segment",
                "start": start,
                "stop": stop,
                "file": "segment.onnx",
                "offset": 0,
            }
            names = {"files": t["files"], "files.meta": t["files.meta"], "files.segment": segment}
        elif protocol == "kv":
            names = {"kv": {**t["kv"], "e": epoch}}
        elif protocol == "probe":
            names = {"probe.echo": t["probe.echo"], "probe.sink": t["probe.sink"]}
        else:
            names = {"dataplane": t["dataplane"]}
        batches = []
        for name, template in names.items():
            batches += batches_of(
                name, lambda _v, tp=template: tp, name, counts[protocol], rng, mesh.n
            )
        wire = DATAPLANE_PROTOCOL if protocol == "dataplane" else proto(protocol)

        async def send(i: int, case: hv.Case, label: str) -> None:
            if protocol == "kv" and rng.randrange(4) == 0:  # some over the data plane
                a.note(i, case)
                try:
                    with trio.fail_after(SEND_S):
                        await a.ensure_admitted(i)
                        s = await a.ep.open_stream(mesh.ids[i], "kv")
                        try:
                            await s.write(frame(case.data))
                            # No half-close on the data plane: a request cut short waits for
                            # the rest until the server's own deadline, so do not wait it out.
                            with trio.move_on_after(3):
                                while await s.read(1 << 16):
                                    pass
                        finally:
                            await s.close()
                except trio.TooSlowError:
                    await a.suspect(i, label, "")
                    await a.wedged(i, label, "took no KV request on the data plane")
                except PeerUnreachable:
                    pass  # the victim's choice
                a.check_alive(i, label)
                return
            await a.exchange(i, wire, frame(case.data), case, label)

        await run_batches(a, batches, send, expected)
        print(f"\n{protocol} requests: {a.summary()}")


async def test_truncated_frames_and_resets(mesh: Mesh, expected: list[int]) -> None:
    """Every protocol's stream: frames over the limit, cut in the header or the payload,
    empty, claiming more than follows; each stream then closed or reset."""
    rng = random.Random(SEED + 5)
    async with attacker(mesh) as a:
        t = hv.templates(context(mesh, a.ep))
        valid = {
            "ctl": t["ctl.hb"],
            "act": t["act.fwd"],
            "files": t["files"],
            "kv": t["kv"],
            "probe": t["probe.echo"],
            "dataplane": t["dataplane"],
        }
        wires = {"ctl": CTL_PROTOCOL, "dataplane": DATAPLANE_PROTOCOL}
        batch = []
        for k in range(300):
            name = list(valid)[k % len(valid)]
            kind, data = hv.frame_attacks(rng, hv.encode(valid[name]))
            batch.append(((k // len(valid)) % mesh.n, hv.Case(kind, data, name)))

        async def send(i: int, case: hv.Case, label: str) -> None:
            wire = wires.get(case.protocol, proto(case.protocol))
            await a.exchange(i, wire, case.data, case, label, reset=rng.randrange(2) == 0)

        await run_batches(
            a, [Batch("framing #1", batch[:150]), Batch("framing #2", batch[150:])], send, expected
        )
        print(f"\nframing: {a.summary()}")


def _reset_after(port: int, data: bytes) -> None:
    """Connect, send *data*, and reset (SO_LINGER 0) instead of closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if data:
            with suppress(OSError):
                s.sendall(data)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_outsiders_reset_connections(mesh: Mesh, expected: list[int]) -> None:
    """Without the secret: a few bytes to the data-plane and libp2p ports, then a reset, many
    times; and, with the private-network key but not the secret, hostile challenge frames."""
    rng = random.Random(SEED + 6)
    sent: collections.Counter[str] = collections.Counter()
    for k in range(2):
        for i in range(mesh.n):
            libp2p_port = int(Multiaddr(mesh.addrs[i]).value_for_protocol("tcp"))
            data_ports = listening_tcp_ports(mesh.peers[i].pid) - {libp2p_port}
            assert data_ports, f"no data-plane port found for peer-{i}"
            for port, what in [(p, "dataplane") for p in data_ports] + [(libp2p_port, "libp2p")]:
                for _ in range(100):
                    n = rng.choice([0, 1, 5, 31, 32, 33, 64, 200])
                    data = rng.randbytes(n)
                    if what == "libp2p" and rng.randrange(3) == 0:
                        data = b"\x13/multistream/1.0.0\n" + data
                    try:
                        await trio.to_thread.run_sync(_reset_after, port, data)
                    except OSError as exc:
                        assert running(mesh.peers[i].pid), (
                            f"{mesh.role(i)} died after an outsider reset its {what} port "
                            f"({exc})\n{log_tail(mesh.homes[i])}"
                        )
                    sent[what] += 1
                problem = await trio.to_thread.run_sync(trouble, mesh, i)
                assert problem is None, (
                    f"{mesh.role(i)} {problem} after an outsider sent a few bytes to its {what} "
                    f"port and reset the connection, 100 times (last: {data[:16].hex()})\n"
                    f"{log_tail(mesh.homes[i])}"
                )
        assert (await trio.to_thread.run_sync(answer, mesh.homes[k % mesh.n]))["token_ids"] == (
            expected
        ), "after the outsiders' resets the mesh answers differently"

    # With the network key but not the secret: hostile challenge frames on the auth stream.
    stolen = PnetOnly(secrets.token_bytes(32), stolen_pnet=MeshSecret.load(mesh.homes[0]).pnet_key)
    ep = Libp2pEndpoint(
        EndpointOptions(
            secrets.token_bytes(32),
            stolen,
            ("/ip4/127.0.0.1/tcp/0",),
            handshake_timeout_s=HANDSHAKE_S,
        )
    )
    template = hv.templates()["auth.hello"]
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.run)
        for k, case in enumerate(hv.hostile_cases(rng, template, 60, protocol="auth.hello")):
            i = k % mesh.n
            info = info_from_p2p_addr(Multiaddr(mesh.addrs[i]))
            ep._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 60)
            with trio.move_on_after(HANDSHAKE_S + 2):
                with suppress(Exception):
                    ep._host.get_network()._negative_peer_cache.evict(str(info.peer_id))
                with suppress(Exception):
                    s = await ep._host.new_stream(info.peer_id, [AUTH_PROTOCOL])
                    await s.write(frame(case.data))
                    while await s.read(4096):
                        pass
            sent["auth.hello"] += 1
            assert running(mesh.peers[i].pid), (
                f"{mesh.role(i)} died after a challenge frame {case.short()} from a peer with the "
                f"network key but not the secret\n{log_tail(mesh.homes[i])}"
            )
        nursery.cancel_scope.cancel()
    got = await trio.to_thread.run_sync(answer, mesh.homes[0])
    assert got["token_ids"] == expected, "after hostile challenges the mesh answers differently"
    print(f"\noutsiders: {sum(sent.values())} cases {dict(sent)}")
