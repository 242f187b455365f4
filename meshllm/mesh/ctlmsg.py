"""The control protocol's messages (``/meshllm/ctl/1.0.0``): heartbeats, pre-votes, votes,
goodbyes and the application messages riding along, decoded strictly (raises BadMessage)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2

from meshllm import wire
from meshllm.mesh.roster import NO_VERSION, Roster, Version
from meshllm.wire import BadMessage

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
PROTOCOL_VERSION = 1
MAX_MEMBERS = 256
MAX_ADDRS = 16


def _addrs(value: Any, what: str) -> list[str]:
    return wire.seq_of(value, what, MAX_ADDRS, lambda v, w: wire.text(v, w, 512, empty=False))


def decode_message(
    payload: bytes, decode_extra: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """Decode and validate one control message; raises BadMessage.

    *decode_extra* turns a heartbeat's ``x`` (the state the layer above publishes) into its
    typed value; without it ``x`` must still be a map.
    """
    msg = wire.mapping(wire.loads(payload), "control message")
    if msg.get("v") != PROTOCOL_VERSION:
        raise BadMessage("not a version-1 control message")
    kind = msg.get("t")
    out: dict[str, Any] = {"t": kind, "term": wire.integer(msg.get("term"), "term")}
    if kind == "hb":
        role = msg.get("role")
        if role not in (FOLLOWER, CANDIDATE, LEADER):
            raise BadMessage(f"bad role {wire.show(role)}")
        out["role"] = role
        out["leader"] = wire.optional(msg.get("leader"), "leader", wire.peer_id)
        out["name"] = wire.text(msg.get("name"), "name", 128)
        out["addrs"] = _addrs(msg.get("addrs"), "addrs")
        members = wire.mapping(msg.get("members"), "members", MAX_MEMBERS)
        out["members"] = {
            wire.peer_id(k, "member"): _addrs(v, "member addrs") for k, v in members.items()
        }
        extra = msg.get("x", {})
        out["x"] = decode_extra(extra) if decode_extra else wire.mapping(extra, "state")
        out["roster"] = wire.optional(msg.get("roster"), "roster", Roster.from_wire)
    elif kind in ("vreq", "pvreq"):
        out["rv"] = _version(msg.get("rv"))
    elif kind in ("vres", "pvres"):
        out["granted"] = wire.flag(msg.get("granted"), "granted")
    elif kind == "app":
        out["body"] = wire.mapping(msg.get("body"), "app message")
    elif kind == "bye":
        out["roster"] = wire.optional(msg.get("roster"), "roster", Roster.from_wire)
    else:
        raise BadMessage(f"unknown message type {wire.show(kind)}")
    return out


def _version(value: Any) -> Version:
    if value is None:
        return NO_VERSION
    v = wire.seq(value, "roster version", 2)
    if len(v) != 2:
        raise BadMessage("roster version must be [term, change]")
    return wire.integer(v[0], "roster term"), wire.integer(v[1], "roster change")


def encode_message(kind: str, term: int, **fields: Any) -> bytes:
    return cbor2.dumps({"v": PROTOCOL_VERSION, "t": kind, "term": term, **fields})
