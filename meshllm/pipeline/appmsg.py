"""Application messages between peers (the ``app`` control message), decoded and checked.

``{"kind": "serve", rid, model, partitioner?, objective?, balance?}`` asks the leader for a plan;
``{"kind": "profile", sha, source, refresh}`` asks a peer to profile itself for a model. Both
come from other peers, so both are checked with :mod:`meshllm.wire` before anything acts on
them; an unknown kind is refused.
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

    def to_obj(self) -> dict[str, Any]:
        return {"kind": "serve", "rid": self.rid, "model": self.model,
                "partitioner": self.partitioner, "objective": self.objective,
                "balance": self.balance}  # fmt: skip


@dataclass(frozen=True)
class ProfileAsk:
    sha: str
    source: str
    refresh: bool

    def to_obj(self) -> dict[str, Any]:
        return {"kind": "profile", "sha": self.sha, "source": self.source,
                "refresh": self.refresh}  # fmt: skip


def decode(body: Any) -> ServeAsk | ProfileAsk:
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
        )
    if kind == "profile":
        return ProfileAsk(
            sha=wire.sha256_hex(body.get("sha"), "sha"),
            source=wire.peer_id(body.get("source"), "source"),
            refresh=wire.flag(body.get("refresh", False), "refresh"),
        )
    raise wire.BadMessage(f"unknown app message kind {wire.show(kind)}")
