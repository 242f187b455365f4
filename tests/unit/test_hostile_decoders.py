"""Every decoder of input from another process, fed hostile CBOR: the one error it may raise is
``BadMessage`` (or a subclass), and what :func:`meshllm.wire.loads` lets through is plain.

The payloads come from :mod:`tests.hostile_values`: valid messages of every protocol with one
field (or the framing) replaced by bignums, CBOR decimals and bigfloats, NaN and infinities,
NUL and path characters, huge declared lengths, deep nesting, unknown tags, indefinite lengths,
wrong types, truncations. The seeded loop runs at least 10^4 cases per run; the hypothesis
tests shrink what they find. ``--hypothesis-profile=long`` runs far more of those.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm import wire
from meshllm.mesh import dataplane
from meshllm.mesh.admission import auth_message
from meshllm.mesh.ctlmsg import decode_message
from meshllm.pipeline import appmsg, files, kvmove
from meshllm.pipeline.frames import decode_frame
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.profiling import probe_message
from meshllm.pipeline.stage_requests import KVMoveFailed
from meshllm.plan.profile import Profile
from tests import hostile_values as hv

settings.register_profile("long", max_examples=20_000, deadline=None)


def _auth(data: bytes) -> Any:
    msg = auth_message(wire.loads(data))
    for key in ("nonce", "mac"):
        if key in msg and not isinstance(msg[key], bytes):
            raise wire.BadMessage(f"{key} must be bytes")
    return msg


# One decoder per template (tests/hostile_values.templates): what the daemon calls on the
# bytes of that protocol's first frame.
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "ctl": lambda d: decode_message(d, PeerState.from_obj),
    "app": lambda d: appmsg.decode(wire.loads(d)),
    "act": decode_frame,
    "files": lambda d: files.FileRequest.from_obj(wire.loads(d)),
    "kv": lambda d: kvmove.parse_request(wire.loads(d)),
    "probe": lambda d: probe_message(wire.loads(d)),
    "dataplane": lambda d: dataplane.ticket_request(wire.loads(d)),
    "auth": _auth,
    "plan": lambda d: Plan.from_obj(wire.loads(d)),
    "profile": lambda d: Profile.from_obj(wire.loads(d)),
}


# Fits the template: one position of one layer is 64 bytes.
KV_LAYOUT = kvmove.Layout(kv_heads=1, head_size=16, dtype=np.dtype(np.float32), max_positions=64)


def _file_header(d: bytes) -> Any:
    try:
        return files.FileHeader.from_obj(wire.loads(d), "source", "f")
    except files.TransferError as exc:  # the server said no: a refusal, not a bad message
        raise wire.BadMessage(str(exc)) from None


def _kv_reply(d: bytes) -> Any:
    try:
        return kvmove.parse_reply(wire.loads(d), KV_LAYOUT, [0, 1])
    except KVMoveFailed as exc:  # the old stage said it failed: a refusal
        raise wire.BadMessage(str(exc)) from None


# Replies, decoded by the side that asked.
DECODERS.update(
    {
        "files.header": _file_header,
        "files.refusal": _file_header,
        "kv.layer": _kv_reply,
        "kv.done": _kv_reply,
        "dataplane.offer": lambda d: dataplane.Ticket.from_obj(wire.loads(d)),
        "auth.reply": _auth,
        "auth.verdict": _auth,
    }
)
# A link probe's replies are only timed, never decoded: nothing to test there.
UNDECODED = {"probe.echo-reply", "probe.got"}


def decoder_for(protocol: str) -> Callable[[bytes], Any]:
    return DECODERS.get(protocol) or DECODERS[protocol.split(".")[0]]


PROTOCOLS = sorted(set(hv.templates()) - UNDECODED)
CASES_PER_PROTOCOL = 350  # x 34 protocols: over 10^4 per run


def test_every_template_decodes() -> None:
    """The templates are valid messages: a hostile case is then one change away from valid,
    which is what makes it reach deep into each decoder."""
    for protocol in PROTOCOLS:
        data = cbor2.dumps(hv.templates()[protocol])
        if protocol == "files.refusal":  # valid, and decoded as the refusal it is
            with pytest.raises(wire.BadMessage, match="refused"):
                decoder_for(protocol)(data)
            continue
        decoder_for(protocol)(data)


def test_ten_thousand_hostile_messages_raise_only_bad_message() -> None:
    rng = random.Random(19)
    ran = 0
    slowest = (0.0, "")
    for protocol in PROTOCOLS:
        decode = decoder_for(protocol)
        for case in hv.hostile_cases(
            rng, hv.templates()[protocol], CASES_PER_PROTOCOL, protocol=protocol
        ):
            t0 = time.perf_counter()
            try:
                decode(case.data)
            except wire.BadMessage:
                pass
            except Exception as exc:  # pragma: no cover - the failure being tested for
                pytest.fail(f"{case.short()} raised {type(exc).__name__}: {exc}")
            slowest = max(slowest, (time.perf_counter() - t0, case.short()))
            ran += 1
    assert ran >= 10_000
    # Not a timing test: a decimal like 1E+600000 used to cost seconds per message, and a
    # regression would show here by orders of magnitude, not by a few percent.
    assert slowest[0] < 2.0, slowest


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, bool | float | str | bytes) or value is None:
        return True
    if isinstance(value, int):
        return -(2**64) <= value < 2**64
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(hv.hostile_items().map(lambda item: item[1]), st.binary(max_size=300)))
def test_wire_loads_gives_plain_values_or_bad_message(data: bytes) -> None:
    try:
        value = wire.loads(data)
    except wire.BadMessage:
        return
    assert _plain(value), value


@pytest.mark.parametrize("protocol", PROTOCOLS)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hostile_messages_shrink_to_a_named_failure(protocol: str, data: st.DataObject) -> None:
    payload = data.draw(hv.hostile_cbor(hv.templates()[protocol]))
    with contextlib.suppress(wire.BadMessage):
        decoder_for(protocol)(payload)


def test_scan_refuses_tags_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CBOR decimal (tag 4) is refused from its header: cbor2 never builds the Decimal whose
    int() held the event loop for seconds."""

    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("cbor2 was asked to decode a tagged item")

    monkeypatch.setattr(wire.cbor2, "loads", never)
    for item in (
        hv.decimal_fraction(600_000, 1),
        hv.bignum(10**5000 - 1),
        hv.bigfloat(10**6, 3),
        hv.tag(1234, hv.uint(1)),
    ):
        with pytest.raises(wire.BadMessage, match="tag"):
            wire.loads(hv.cmap((hv.tstr("term"), item)))


@pytest.mark.parametrize(
    "data, reason",
    [
        (hv.claims_length(3, 2**63), "longer than the message"),
        (hv.deep_array(10_000), "nested deeper"),
        (hv.indefinite(4) + hv.BREAK, "indefinite"),
        (hv.simple(23), "simple values"),
        (cbor2.dumps(1) + b"\x00", "bytes after"),
        (b"", "ends inside"),
    ],
)
def test_scan_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(wire.BadMessage, match=reason):
        wire.scan(data)
