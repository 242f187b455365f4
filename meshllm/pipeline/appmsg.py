"""Application messages between peers (the ``app`` control message), decoded and checked.

``{"kind": "serve", rid, model, partitioner?, objective?, balance?, resent?}`` asks the leader for
a plan, and ``{"kind": "served", rid, epoch | error}`` is the leader's reply to the asker (see
:mod:`meshllm.pipeline.serve_desk`); ``{"kind": "profile", sha, source, refresh}`` asks a peer
to profile itself for a model. They come from other peers, so each is checked with
:mod:`meshllm.wire` before anything acts on it; an unknown kind is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm import wire


@dataclass(frozen=True)
class ServeAsk:
    rid: str
    model: str
    partitioner: str | None
    objective: str | None
    balance: str | None
    # Sent again to a new leader: a plan already live that satisfies it is the answer.
    resent: bool = False

    def to_obj(self) -> dict[str, Any]:
        return {
            "kind": "serve",
            "rid": self.rid,
            "model": self.model,
            "partitioner": self.partitioner,
            "objective": self.objective,
            "balance": self.balance,
            "resent": self.resent,
        }


@dataclass(frozen=True)
class ServeReply:
    """The leader's answer to a serve request: the epoch of its plan, or why none."""

    rid: str
    epoch: int | None = None
    error: str | None = None

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "served", "rid": self.rid}
        if self.epoch is not None:
            out["epoch"] = self.epoch
        else:
            out["error"] = (self.error or "no plan")[:2000]
        return out


@dataclass(frozen=True)
class ProfileAsk:
    sha: str
    source: str
    refresh: bool

    def to_obj(self) -> dict[str, Any]:
        return {"kind": "profile", "sha": self.sha, "source": self.source, "refresh": self.refresh}


def decode(body: Any) -> ServeAsk | ServeReply | ProfileAsk:
    """The request *body* carries (raises :class:`~meshllm.wire.BadMessage`)."""
    body = wire.mapping(body, "app message")
    kind = body.get("kind")
    if kind == "serve":
        return ServeAsk(
            rid=wire.text(body.get("rid", ""), "rid", 64),
            model=wire.name(body.get("model"), "model"),
            partitioner=wire.optional(body.get("partitioner"), "partitioner", wire.name),
            objective=wire.optional(body.get("objective"), "objective", wire.name),
            balance=wire.optional(body.get("balance"), "balance", wire.name),
            resent=wire.flag(body.get("resent", False), "resent"),
        )
    if kind == "served":
        rid = wire.text(body.get("rid"), "rid", 64)
        if "epoch" in body:
            return ServeReply(rid, epoch=wire.integer(body["epoch"], "epoch", 1))
        return ServeReply(rid, error=wire.text(body.get("error"), "error", 1 << 16)[:2000])
    if kind == "profile":
        return ProfileAsk(
            sha=wire.sha256_hex(body.get("sha"), "sha"),
            source=wire.peer_id(body.get("source"), "source"),
            refresh=wire.flag(body.get("refresh", False), "refresh"),
        )
    raise wire.BadMessage(f"unknown app message kind {wire.show(kind)}")
