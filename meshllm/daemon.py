"""``meshllm daemon``: the long-running peer.

Task tree::

    root nursery
    ├── signal watcher (SIGINT/SIGTERM -> graceful stop)
    ├── transport endpoint (listener, per-connection tasks)
    ├── mesh node (receive loop, heartbeats, election timer)
    ├── serving (meshllm.pipeline.service), one task per component:
    │   ├── peer requests: profiling asked by the leader; new imports advertised
    │   ├── links: activation frames in and out (a reader per inbound link)
    │   ├── kv caches: old plans' caches kept, prefetched and served
    │   ├── segment loader: each adopted plan's segment fetched, loaded; the stage running
    │   ├── serve desk: `serve` requests sent to the leader, and answered when leading
    │   ├── leader: a new plan when a stage's peer is lost
    │   └── balancer: layers moved off a stage that slowed down
    ├── bootstrap dials
    ├── HTTP API, when enabled (one task per HTTP client)
    └── control server (one task per local client)
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import trio

from meshllm import __version__
from meshllm.config import CONFIG_FILE, ApiSection, Config, load_config
from meshllm.control.protocol import SOCKET_NAME, ControlError
from meshllm.control.server import ControlServer
from meshllm.errors import MeshError
from meshllm.log import configure
from meshllm.mesh.identity import MeshSecret, load_identity
from meshllm.mesh.node import MeshNode
from meshllm.mesh.peerstore import bootstrap_addrs, load_peers, save_peers
from meshllm.mesh.transport import (
    AdmissionRefused,
    EndpointOptions,
    PeerUnreachable,
    ReportsStats,
)
from meshllm.pipeline import memory_lesson
from meshllm.plugins import TransportRegistry, get_plugin_manager

DAEMON_FILE = "daemon.json"
log = structlog.get_logger("meshllm.daemon")


MAX_SAVED_PEERS = 256
STOP_GRACE_S = 2.0  # for queries coordinated here to finish when the daemon is asked to stop


class Daemon:
    def __init__(self, home: Path, config: Config):
        self.home = home
        self.config = config
        self.secret = MeshSecret.load(home)
        # One plugin manager for the whole daemon: every registry reads the same plugins.
        self.plugins = get_plugin_manager()
        transport = TransportRegistry(self.plugins).get(config.mesh.transport)
        self.endpoint = transport.create_endpoint(
            EndpointOptions(
                key_seed=load_identity(home),
                secret=self.secret,
                listen=config.peer.listen,
                handshake_timeout_s=config.mesh.handshake_timeout_s,
            )
        )
        self.node = MeshNode(
            self.endpoint, config.mesh, name=config.peer.name, on_members_changed=self._save_members
        )
        from meshllm.pipeline.service import ServingService

        self.serving = ServingService(home, config, self.endpoint, self.node, self.plugins)
        self.api = self._make_api() if config.api.enabled else None
        self.api_address: dict[str, Any] | None = None  # where the API listens, once it does
        self._stop = trio.Event()

    def _make_api(self) -> Any:
        from meshllm.api.http import HttpServer
        from meshllm.api.openai import OpenAIApi

        handler = OpenAIApi(self.serving.gateway, max_new_tokens=self.config.limits.max_new_tokens)
        api = self.config.api
        return HttpServer(
            handler,
            api.host,
            api.port,
            allowed_hosts=api.allowed_hosts,
            allowed_origins=api.allowed_origins,
        )

    def _save_members(self, members: dict[str, list[str]]) -> None:
        # Members now first, then what was saved before (peers away for a while), up to a
        # bound: the file is read and written whole on every change.
        saved = load_peers(self.home)
        peers = {"": saved.pop("", [])} if "" in saved else {}
        for pid, addrs in [*members.items(), *saved.items()]:
            if len(peers) >= MAX_SAVED_PEERS:
                break
            peers.setdefault(pid, addrs)
        save_peers(self.home, peers)

    # -- control operations (the only things callable over the socket) ------------------------
    async def op_status(self, args: dict[str, Any]) -> Any:
        return {
            **self.node.status(),
            "mesh_id": self.secret.mesh_id,
            "version": __version__,
            "pid": os.getpid(),
            "transport": self.config.mesh.transport,
            "transport_stats": self._transport_stats(),
            "serving": self.serving.serving_status(),
            "api": self.api_address,
        }

    def _transport_stats(self) -> dict[str, Any] | None:
        if not isinstance(self.endpoint, ReportsStats):
            return None
        try:
            return self.endpoint.stats()
        except Exception as exc:  # a plugin's bug must not take status down with it
            log.warning(
                "transport_stats_failed", transport=self.config.mesh.transport, reason=repr(exc)
            )
            return {"error": repr(exc)}

    async def op_peers(self, args: dict[str, Any]) -> Any:
        return self.node.status()["peers"]

    async def op_peers_add(self, args: dict[str, Any]) -> Any:
        addr = args.get("addr")
        if not isinstance(addr, str) or not addr:
            raise ControlError("bad_request", "peers.add needs args.addr (a multiaddr string)")
        try:
            with trio.fail_after(self.config.mesh.handshake_timeout_s + 1):
                peer_id = await self.node.add_peer(addr)
        except trio.TooSlowError:
            raise ControlError("unreachable", f"no answer from {addr} in time") from None
        except AdmissionRefused as exc:
            raise ControlError("refused", str(exc)) from None
        except PeerUnreachable as exc:
            raise ControlError("unreachable", str(exc)) from None
        return {"peer_id": peer_id}

    async def op_stop(self, args: dict[str, Any]) -> Any:
        self._stop.set()
        return {"stopping": True}

    # -- running ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        control = ControlServer(
            self.home / SOCKET_NAME,
            {
                "status": self.op_status,
                "peers": self.op_peers,
                "peers.add": self.op_peers_add,
                "stop": self.op_stop,
                "serve": self.serving.op_serve,
                "profile": self.serving.op_profile,
            },
            streaming={"query": self.serving.gateway.op_query},
        )
        memory_lesson.learn_at_start(self.home)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            await nursery.start(self.endpoint.run)
            await nursery.start(self.node.run)
            for _name, component in self.serving.components():
                await nursery.start(component)
            by_peer: dict[str, list[str]] = {}
            for addr in bootstrap_addrs(self.home):
                by_peer.setdefault(addr.rsplit("/p2p/", 1)[-1], []).append(addr)
            for addrs in by_peer.values():
                # One peer's addresses in turn: concurrent dials to one peer id are merged by
                # libp2p, so a stale address would fail the fresh one too.
                nursery.start_soon(self._bootstrap, addrs)
            if self.api is not None:
                await self._start_api(nursery)
            await nursery.start(control.run)
            self._write_daemon_file()
            log.info(
                "daemon_ready",
                peer=self.endpoint.peer_id,
                addrs=self.endpoint.listen_addrs(),
                mesh=self.secret.mesh_id,
            )
            task_status.started()
            await self._stop.wait()
            log.info("daemon_stopping")
            # Grace: the queries coordinated here may finish (new ones are refused), while
            # this peer still runs its stage for them.
            self.serving.gateway.stopping = True
            with trio.move_on_after(STOP_GRACE_S):
                await self.serving.gateway.drained()
            # Goodbyes: the others drop this peer from the roster at once (two phones, one
            # stopping, leave the other leading) instead of waiting it out as a crash.
            with trio.move_on_after(1.0):
                await self.node.leave()
            nursery.cancel_scope.cancel()
        (self.home / DAEMON_FILE).unlink(missing_ok=True)
        memory_lesson.released(self.home)  # a stop, not a kill: nothing to learn

    async def _start_api(self, nursery: trio.Nursery) -> None:
        from meshllm.api.browser import url_host

        host, port = await nursery.start(self.api.run)  # type: ignore[union-attr]
        url = f"http://{url_host(host)}:{port}/v1"
        self.api_address = {"host": host, "port": port, "url": url}
        log.info("api_listening", url=url, host=host, port=port)
        if not _is_loopback(host):
            log.warning(
                "api_not_local",
                host=host,
                reason="the HTTP API has no authentication: anyone who can reach "
                "this address can use the mesh",
            )

    def _write_daemon_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "peer_id": self.endpoint.peer_id,
            "addrs": self.endpoint.listen_addrs(),
        }
        (self.home / DAEMON_FILE).write_text(json.dumps(info))

    async def _bootstrap(self, addrs: list[str]) -> None:
        for addr in addrs:
            try:
                with trio.fail_after(self.config.mesh.handshake_timeout_s + 1):
                    peer_id = await self.node.add_peer(addr)
                log.info("bootstrap_connected", addr=addr, other=peer_id)
                return
            except AdmissionRefused as exc:
                log.error("admission_refused", addr=addr, reason=str(exc))
                return
            except (PeerUnreachable, trio.TooSlowError) as exc:
                log.warning("bootstrap_unreachable", addr=addr, reason=str(exc) or "timeout")

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self._stop.set()
                return


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_daemon(home: Path, api: ApiSection | None = None) -> None:
    """Run the daemon of *home* until stopped; *api* replaces the config's ``[api]``."""
    config = load_config(home / CONFIG_FILE)
    if api is not None:  # --api: where to listen; the config's browser rules still apply
        config = replace(
            config, api=replace(config.api, enabled=api.enabled, host=api.host, port=api.port)
        )
    configure(config.log.level)
    daemon = Daemon(home, config)
    try:
        trio.run(daemon.run)
    except BaseExceptionGroup as group:
        # A component that could not start (the API's port taken, another daemon on this
        # home) says why in one line, like any MeshError, not as a traceback.
        deliberate = group.subgroup(lambda e: isinstance(e, MeshError))
        if deliberate is None:
            raise
        first: BaseException = deliberate
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
