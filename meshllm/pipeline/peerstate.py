"""What a serving peer publishes on its heartbeats, decoded once into one typed value.

A heartbeat's ``x`` map is small state, re-sent every interval (losing one costs nothing):

  ``models``          models imported here: name -> {sha, layers}
  ``serving``         this peer's state for its plan: {epoch, state, progress, bytes, ...}
  ``rss_mb``          resident memory
  ``profile``         its newest profile; ``profile_errors``: model sha -> why profiling failed
  ``replan_error``    leader: why a plan that lost a peer could not be replaced {epoch, error}
  ``stage_stats``     its stage's figures, for the balancer and status
  ``staged``          leader: a plan being prepared while the current one serves
  ``prepared``        the staged epoch this peer has loaded
  ``plan``            the newest plan this peer knows
  ``stages``          false: it runs no layers (``[peer] stages``); absent means true

:meth:`PeerState.from_obj` checks all of it with :mod:`meshllm.wire` as the heartbeat arrives;
a heartbeat whose state does not decode is dropped whole, with the reason logged. Unknown keys
are ignored (see :mod:`meshllm.wire`), so a newer peer may publish more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshllm import wire
from meshllm.pipeline.plan import Plan
from meshllm.plan.profile import Profile

MAX_MODELS = 256
SERVING_STATES = ("idle", "fetching", "loading", "ready", "error")
_TEXT_MAX = 2000


def _display(value: Any, what: str) -> str:
    """Text shown to a user (a state's detail, an error): checked, and clipped rather than
    refused when long, so one verbose error cannot make a peer's heartbeats unreadable."""
    return wire.text(value, what, 1 << 16)[:_TEXT_MAX]


@dataclass(frozen=True)
class ModelFacts:
    """A model imported on a peer, as it advertises it."""

    sha: str
    layers: int

    def to_obj(self) -> dict[str, Any]:
        return {"sha": self.sha, "layers": self.layers}


def _facts(value: Any, what: str) -> ModelFacts:
    obj = wire.mapping(value, what)
    return ModelFacts(
        wire.sha256_hex(obj.get("sha"), f"{what} sha"),
        wire.integer(obj.get("layers"), f"{what} layers", 1, 4097),
    )


def _serving(value: Any) -> dict[str, Any]:
    obj = wire.mapping(value, "serving")
    state = wire.choice(obj.get("state"), "serving state", SERVING_STATES)
    out: dict[str, Any] = {
        "epoch": wire.integer(obj.get("epoch", 0), "serving epoch"),
        "state": state,
    }
    if "progress" in obj:
        out["progress"] = wire.number(obj["progress"], "progress", 0.0, 1e3)
    for key in ("bytes", "segment_bytes"):
        if key in obj:
            out[key] = wire.integer(obj[key], key)
    for key in ("detail", "role", "layers"):
        if key in obj:
            out[key] = _display(obj[key], key)
    return out


def _stage_stats(value: Any) -> dict[str, float | int]:
    obj = wire.mapping(value, "stage_stats")
    out: dict[str, float | int] = {}
    for key, v in obj.items():
        # Every figure is a count or a duration; counts stay ints (status shows them as such).
        out[key] = (
            v
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < wire.INT_MAX
            else wire.number(v, f"stage_stats {key}", 0.0)
        )
    if "epoch" not in out or not isinstance(out["epoch"], int):
        raise wire.BadMessage("stage_stats without an epoch")
    return out


@dataclass(frozen=True)
class PeerState:
    models: dict[str, ModelFacts] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    rss_mb: float | None = None
    profile: Profile | None = None
    profile_errors: dict[str, str] = field(default_factory=dict)
    replan_error: tuple[int, str] | None = None
    stage_stats: dict[str, float | int] | None = None
    staged: Plan | None = None
    prepared: int = 0
    plan: Plan | None = None
    stages: bool = True

    @classmethod
    def from_obj(cls, raw: Any) -> PeerState:
        """The state a heartbeat carried (raises :class:`~meshllm.wire.BadMessage`)."""
        obj = wire.mapping(raw, "peer state")
        models = {
            wire.name(k, "model name"): _facts(v, f"model {k}")
            for k, v in wire.mapping(obj.get("models", {}), "models", MAX_MODELS).items()
        }
        errors = {
            wire.sha256_hex(k, "profile error sha"): _display(v, "profile error")
            for k, v in wire.mapping(
                obj.get("profile_errors", {}), "profile_errors", MAX_MODELS
            ).items()
        }
        replan = obj.get("replan_error")
        if replan is not None:
            replan = wire.mapping(replan, "replan_error")
            replan = (
                wire.integer(replan.get("epoch"), "replan epoch"),
                _display(replan.get("error"), "replan error"),
            )
        return cls(
            models=models,
            serving=_serving(obj["serving"]) if "serving" in obj else {},
            rss_mb=wire.optional(obj.get("rss_mb"), "rss_mb", wire.number),
            profile=wire.optional(obj.get("profile"), "profile", _profile),
            profile_errors=errors,
            replan_error=replan,
            stage_stats=wire.optional(obj.get("stage_stats"), "stage_stats", _stats),
            staged=wire.optional(obj.get("staged"), "staged", _plan),
            prepared=wire.integer(obj.get("prepared", 0), "prepared"),
            plan=wire.optional(obj.get("plan"), "plan", _plan),
            stages=wire.flag(obj.get("stages", True), "stages"),
        )


def _profile(value: Any, _what: str) -> Profile:
    return Profile.from_obj(value)


def _plan(value: Any, _what: str) -> Plan:
    return Plan.from_obj(value)


def _stats(value: Any, _what: str) -> dict[str, float | int]:
    return _stage_stats(value)
