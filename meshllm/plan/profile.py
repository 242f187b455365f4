"""Device profiles: what a peer measures about itself for the planner.

Plain data, decoded and checked once: the measuring itself is :mod:`meshllm.device`, so the
planner stays pure (profiles in, a plan out).

Links are measured by the serving service over the mesh itself (see ``LinkStats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshllm import wire
from meshllm.errors import MeshError

MiB = 1 << 20


MAX_LINKS = 256


class ProfileError(MeshError):
    """A profile that cannot be measured or does not decode."""


class BadProfile(ProfileError, wire.BadMessage):
    """A profile from another peer that does not decode."""


@dataclass(frozen=True)
class LinkStats:
    """One direction of a link as this peer measured it over the mesh."""

    rtt_s: float  # round trip of a small frame, both ends' frame handling included
    bandwidth_Bps: float  # bytes per second for a bulk transfer

    def transfer_s(self, nbytes: int) -> float:
        """One-way time for a frame of *nbytes*."""
        return self.rtt_s / 2 + nbytes / max(self.bandwidth_Bps, 1.0)


@dataclass(frozen=True)
class Profile:
    """One peer's measured figures for one model (``model_sha``)."""

    model_sha: str
    layer_s: float  # decode seconds of one (middle) layer, one token
    first_s: float  # extra decode seconds of the first stage (embedding)
    last_s: float  # extra decode seconds of the last stage (final norm + lm_head)
    prefill_layer_s: float  # prefill seconds per layer per prompt token
    hop_s: float  # fixed cost of handing one step to ONNX Runtime and back, per stage
    # The same four figures for steps that follow an idle spell (see ``time_probe``): what a
    # stage sees serving a single request, where the ones above are for sustained load.
    idle_layer_s: float
    idle_first_s: float
    idle_last_s: float
    idle_hop_s: float
    memory_bytes: int  # what this peer can give the model (see ``memory_budget``)
    memory_exact: bool  # True when set by config: the planner uses it as is
    threads: int
    measured_at: float
    links: dict[str, LinkStats] = field(default_factory=dict)
    # Memory the peer needs besides a stage: the daemon's own resident memory once its probes
    # ran (runtime, libp2p, Python) plus a session's fixed part; and the resident bytes a
    # loaded segment takes per byte of its weights (see meshllm.device.Calibration). The
    # planner offers the model (memory_bytes - overhead_bytes) / weight_factor. 0 and 1 from
    # a peer of a version that did not measure them.
    overhead_bytes: int = 0
    weight_factor: float = 1.0
    # Learned from an OOM kill (see meshllm.pipeline.memory_lesson): the most weight bytes this
    # peer offers a stage now; 0: no such lesson.
    learned_max_bytes: int = 0

    def to_obj(self) -> dict[str, Any]:
        return {
            "model_sha": self.model_sha,
            "layer_s": self.layer_s,
            "first_s": self.first_s,
            "last_s": self.last_s,
            "prefill_layer_s": self.prefill_layer_s,
            "hop_s": self.hop_s,
            "idle": [self.idle_layer_s, self.idle_first_s, self.idle_last_s, self.idle_hop_s],
            "memory_bytes": self.memory_bytes,
            "memory_exact": self.memory_exact,
            "threads": self.threads,
            "measured_at": self.measured_at,
            "links": {p: [s.rtt_s, s.bandwidth_Bps] for p, s in self.links.items()},
            "overhead_bytes": self.overhead_bytes,
            "weight_factor": self.weight_factor,
            "learned_max_bytes": self.learned_max_bytes,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Profile:
        """A profile another peer published (raises :class:`BadProfile` with the reason)."""
        try:
            return cls._decode(wire.mapping(obj, "profile"))
        except wire.BadMessage as exc:
            raise BadProfile(f"malformed profile: {exc}") from None

    @classmethod
    def _decode(cls, obj: dict[str, Any]) -> Profile:
        def secs(key: str, value: Any = None) -> float:
            return wire.number(obj.get(key) if value is None else value, key, 0.0, 1e6)

        idle = wire.seq(obj.get("idle"), "idle", 4)
        if len(idle) != 4:
            raise wire.BadMessage("idle must hold four figures")
        links = {}
        for peer, raw in wire.mapping(obj.get("links"), "links", MAX_LINKS).items():
            pair = wire.seq(raw, "link", 2)
            if len(pair) != 2:
                raise wire.BadMessage("a link is [rtt_s, bandwidth_Bps]")
            links[wire.peer_id(peer, "link peer")] = LinkStats(
                wire.number(pair[0], "rtt_s", 0.0, 1e6), wire.number(pair[1], "bandwidth", 0.0)
            )
        return cls(
            model_sha=wire.sha256_hex(obj.get("model_sha"), "model_sha"),
            layer_s=secs("layer_s"),
            first_s=secs("first_s"),
            last_s=secs("last_s"),
            prefill_layer_s=secs("prefill_layer_s"),
            hop_s=secs("hop_s"),
            idle_layer_s=secs("idle", idle[0]),
            idle_first_s=secs("idle", idle[1]),
            idle_last_s=secs("idle", idle[2]),
            idle_hop_s=secs("idle", idle[3]),
            memory_bytes=wire.integer(obj.get("memory_bytes"), "memory_bytes"),
            memory_exact=wire.flag(obj.get("memory_exact"), "memory_exact"),
            threads=wire.integer(obj.get("threads"), "threads", 0, 4096),
            measured_at=wire.number(obj.get("measured_at"), "measured_at", 0.0),
            links=links,
            overhead_bytes=wire.integer(obj.get("overhead_bytes", 0), "overhead_bytes"),
            weight_factor=wire.number(obj.get("weight_factor", 1.0), "weight_factor", 1.0, 8.0),
            learned_max_bytes=wire.integer(obj.get("learned_max_bytes", 0), "learned_max_bytes"),
        )
