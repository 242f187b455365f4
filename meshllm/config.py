"""The peer's ``config.toml``: decoded into typed, frozen structures; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError

CONFIG_FILE = "config.toml"


class ConfigError(MeshError):
    """A configuration file that cannot be used, with the file and key at fault."""


@dataclass(frozen=True)
class PeerSection:
    """This peer: its display name and the addresses it listens on."""

    name: str = ""
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    threads: int = 1  # ONNX Runtime threads for this peer's segment
    # This peer's memory in MiB, its daemon's own included (the planner offers the model what
    # is left once the daemon's measured overhead is taken off); 0 means what the device
    # reports (available memory, or its cgroup limit when lower).
    memory_limit_mb: int = 0
    # False: this peer runs no layers. It keeps and serves model files (it can be the source a
    # laptop that converted the model is), answers queries and may lead, but the planner
    # gives it no stage.
    stages: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 256:
            raise ConfigError("[peer] threads must be between 1 and 256")
        if self.memory_limit_mb < 0:
            raise ConfigError("[peer] memory_limit_mb must be >= 0 (0: no limit)")
        # Others refuse a heartbeat whose name breaks these rules (see meshllm.mesh.node).
        if len(self.name) > 128 or "\0" in self.name:
            raise ConfigError("[peer] name must be at most 128 characters, without NUL")


@dataclass(frozen=True)
class MeshSection:
    """Membership and election timing, and admission."""

    heartbeat_interval_s: float = 0.25
    dead_after_s: float = 1.5
    # A peer whose connection is still open is declared dead only after this much silence:
    # a busy phone's heartbeats can come seconds late (profiling, loading a segment on a
    # quarter of a core), while a crashed or stopped peer's connection closes at once.
    unresponsive_after_s: float = 8.0
    election_timeout_min_s: float = 0.8
    election_timeout_max_s: float = 1.6
    handshake_timeout_s: float = 2.0
    transport: str = "libp2p"
    # A query's coordinator gives up on a step after this long without a token (a stage
    # that died is usually noticed sooner: the leader re-plans once it is declared dead).
    step_timeout_s: float = 30.0
    # How long a query interrupted by a lost peer waits for the next plan before failing.
    recovery_timeout_s: float = 120.0
    # A request carried to a new plan whose old peers are all alive (a rebalance) gets its
    # KV cache moved from them; off, or when that fails, it is replayed token by token.
    move_kv: bool = True

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("[mesh] heartbeat_interval_s must be > 0")
        if self.dead_after_s <= self.heartbeat_interval_s:
            raise ConfigError("[mesh] dead_after_s must be longer than heartbeat_interval_s")
        if self.unresponsive_after_s < self.dead_after_s:
            raise ConfigError("[mesh] unresponsive_after_s must be at least dead_after_s")
        if not 0 < self.election_timeout_min_s < self.election_timeout_max_s:
            raise ConfigError("[mesh] need 0 < election_timeout_min_s < election_timeout_max_s")
        if self.handshake_timeout_s <= 0:
            raise ConfigError("[mesh] handshake_timeout_s must be > 0")
        if self.step_timeout_s <= 0 or self.recovery_timeout_s <= 0:
            raise ConfigError("[mesh] step_timeout_s and recovery_timeout_s must be > 0")


OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class PlanSection:
    """How the leader assigns layers to peers (used where this peer is the leader)."""

    partitioner: str = "lp"  # a registered partitioner: lp, even, memory, or a plugin's
    # throughput: minimise the slowest stage (compute + its outgoing transfer);
    # latency: minimise the sum of all stage and link times.
    objective: str = "throughput"
    context_tokens: int = 2048  # KV cache positions reserved per request when sizing memory
    concurrency: int = 4  # requests in flight per stage when sizing memory
    memory_fraction: float = 0.7  # share of a peer's memory the plan may fill

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"[plan] objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}"
            )
        if self.context_tokens < 1 or self.concurrency < 1:
            raise ConfigError("[plan] context_tokens and concurrency must be >= 1")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError("[plan] memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class BalanceSection:
    """The runtime load balancer (used where this peer is the leader)."""

    policy: str = "threshold"  # a registered balancing policy: threshold, none, or a plugin's
    slowdown: float = 1.5  # a stage this many times slower than its baseline (vs the others)
    min_steps: int = 12  # decode steps of evidence before a stage can be judged
    min_gain: float = 1.15  # the new plan must be predicted at least this much faster
    cooldown_s: float = 10.0  # after a re-plan, wait this long before the next one

    def __post_init__(self) -> None:
        if self.slowdown <= 1 or self.min_gain < 1:
            raise ConfigError("[balance] slowdown must be > 1 and min_gain >= 1")
        if self.min_steps < 1 or self.cooldown_s < 0:
            raise ConfigError("[balance] min_steps must be >= 1 and cooldown_s >= 0")


@dataclass(frozen=True)
class LimitsSection:
    """What this peer accepts; a request over a limit gets an error naming the limit."""

    max_prompt_tokens: int = 4096  # prompt tokens of one query
    max_new_tokens: int = 2048  # tokens one query may ask to generate
    max_concurrent_requests: int = 16  # queries coordinated here, and requests per stage
    max_frame_mb: int = 64  # largest activation frame read from another peer
    # Decode steps of different requests a stage runs as one ONNX Runtime call (1: never
    # batch). A batch streams the weights once for all its rows: more tokens per second
    # in all while several requests are in flight, the same tokens for each.
    max_batch: int = 8

    def __post_init__(self) -> None:
        for key in (
            "max_prompt_tokens",
            "max_new_tokens",
            "max_concurrent_requests",
            "max_frame_mb",
            "max_batch",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"[limits] {key} must be >= 1")


@dataclass(frozen=True)
class ApiSection:
    """The OpenAI-compatible HTTP API (off unless enabled; it has no authentication, so it
    listens on this machine only unless told otherwise)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # an IP address or a host name to listen on
    port: int = 8080  # 0: any free port (the bound one is in `status --json` under "api")
    # Host headers accepted besides the listening address itself ("name" or "name:port"; no
    # port: any port), e.g. the name a reverse proxy forwards. Any other name is refused, so
    # that a web page whose name was re-pointed at this machine (DNS rebinding) cannot read.
    allowed_hosts: tuple[str, ...] = ()
    # Web pages ("scheme://host[:port]") whose browser requests are served; a request with
    # any other Origin header is refused (no Origin: not a browser's cross-site request).
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_host(self.host):
            raise ConfigError(
                f"[api] host must be an IP address or a host name (e.g. 127.0.0.1, ::1, "
                f"localhost), not {self.host!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"[api] port must be 0-65535 (0: any free port), not {self.port}")
        for entry in self.allowed_hosts:
            if not _is_host_port(_HOST_PORT.fullmatch(entry)):
                raise ConfigError(
                    f"[api] allowed_hosts: {entry!r} is not HOST or HOST:PORT "
                    f"(e.g. my-box.local, localhost:3000, [::1]:8080)"
                )
        for entry in self.allowed_origins:
            if not _is_host_port(_ORIGIN.fullmatch(entry)):
                raise ConfigError(
                    f"[api] allowed_origins: {entry!r} is not SCHEME://HOST[:PORT] "
                    f"(e.g. http://localhost:3000, with no path)"
                )


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]/:]+)(?::(?P<port>[0-9]{1,5}))?")
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://" + _HOST_PORT.pattern)


def _is_host_port(match: re.Match[str] | None) -> bool:
    """Whether a match of _HOST_PORT (or _ORIGIN) names a valid host and port."""
    if match is None:
        return False
    host, port = match["host"], match["port"]
    if port is not None and not 0 < int(port) <= 65535:
        return False
    if host.startswith("["):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    return _is_host(host)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


@dataclass(frozen=True)
class LogSection:
    level: str = "info"

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"[log] level must be debug, info, warning or error, not {self.level!r}"
            )


@dataclass(frozen=True)
class Config:
    peer: PeerSection = field(default_factory=PeerSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    plan: PlanSection = field(default_factory=PlanSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    api: ApiSection = field(default_factory=ApiSection)
    log: LogSection = field(default_factory=LogSection)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(typ):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: unexpected value {value!r}")
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ in (str, bool):
        if not isinstance(value, typ):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(typ):
        return _decode(typ, value, where)
    raise ConfigError(f"{where}: unsupported type {typ!r}")  # a bug in our own schema


def _decode(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_config(text: str, source: str = CONFIG_FILE) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return _decode(Config, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).lstrip(': ')}") from None


def load_config(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, str(path))


def default_config_text(
    name: str, listen: str = "/ip4/127.0.0.1/tcp/0", *, stages: bool = True
) -> str:
    d, p, api = MeshSection(), PlanSection(), ApiSection()
    return f"""# meshllm peer configuration. Unknown keys are rejected: `meshllm config check FILE`.

[peer]
name = "{name}"
listen = ["{listen}"]
stages = {str(stages).lower()}  # false: keep and serve model files, run no layers

[mesh]
transport = "{d.transport}"
heartbeat_interval_s = {d.heartbeat_interval_s}
dead_after_s = {d.dead_after_s}
unresponsive_after_s = {d.unresponsive_after_s}  # still connected: declared dead only then
election_timeout_min_s = {d.election_timeout_min_s}
election_timeout_max_s = {d.election_timeout_max_s}
handshake_timeout_s = {d.handshake_timeout_s}

[plan]
partitioner = "{p.partitioner}"
objective = "{p.objective}"

# OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models). No
# authentication: keep host on this machine unless every client that can reach it is trusted.
[api]
enabled = {str(api.enabled).lower()}
host = "{api.host}"
port = {api.port}  # 0: any free port

[log]
level = "info"
"""
