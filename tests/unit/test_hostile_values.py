"""The hostile-CBOR generator itself: its items are what they claim to be (checked with cbor2
and by hand), templates are valid, mutations are reproducible and leave fixed fields alone."""

from __future__ import annotations

import math
import random
import struct
from decimal import Decimal

import cbor2
import pytest
from hypothesis import given, settings

from tests import hostile_values as hv


def test_decimal_fraction_decodes_to_a_huge_decimal() -> None:
    item = hv.decimal_fraction(600_000, 1)
    assert item == bytes.fromhex("c4821a000927c001")
    value = cbor2.loads(item)
    assert isinstance(value, Decimal) and value == Decimal("1E+600000")


def test_bignums_and_bigfloats() -> None:
    big = cbor2.loads(hv.bignum(10**5000 - 1))
    assert isinstance(big, int) and big == 10**5000 - 1  # repr() of it would raise
    assert cbor2.loads(hv.bignum(-(10**5000))) == -(10**5000)
    assert hv.bignum(2**64)[0] == 0xC2 and hv.bignum(-1)[0] == 0xC3
    assert cbor2.loads(hv.bigfloat(-1000, 3)) == Decimal(3) * Decimal(2) ** -1000
    assert [cbor2.loads(hv.integer(n)) for n in (0, 23, 24, 2**64 - 1, -(2**64), 2**64)] == [
        0,
        23,
        24,
        2**64 - 1,
        -(2**64),
        2**64,
    ]


def test_floats_are_the_widths_they_claim() -> None:
    assert hv.half(0x7E00)[0] == 0xF9 and math.isnan(cbor2.loads(hv.half(0x7E00)))
    assert cbor2.loads(hv.half(0xFC00)) == -math.inf
    assert hv.single(math.inf)[0] == 0xFA and cbor2.loads(hv.single(math.inf)) == math.inf
    assert len(hv.double(math.nan)) == 9 and math.isnan(cbor2.loads(hv.double(math.nan)))


def test_a_length_header_claims_what_it_says() -> None:
    item = hv.claims_length(hv.TEXT, 2**63, b"abc")
    assert item[0] == 0x7B  # text string, 8-byte length
    assert struct.unpack(">Q", item[1:9])[0] == 2**63 and item[9:] == b"abc"
    with pytest.raises(cbor2.CBORDecodeError):
        cbor2.loads(item)
    assert hv.claims_length(hv.MAP, 2**64 - 1)[:9] == b"\xbb" + b"\xff" * 8


def test_deep_nesting_is_as_deep_as_asked() -> None:
    item = hv.deep_array(10_000)
    depth = 0
    while item[depth] == 0x81:  # one-element array heads, then the leaf
        depth += 1
    assert depth == 10_000 and item[depth:] == b"\x00"
    assert hv.deep_indefinite(5) == b"\x9f" * 5 + b"\x00" + b"\xff" * 5
    value = cbor2.loads(hv.deep_array(50))
    for _ in range(50):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == 0


def test_tags_and_simple_values_decode_as_cbor2_does() -> None:
    assert cbor2.loads(hv.tag(1234, hv.uint(0))) == cbor2.CBORTag(1234, 0)
    assert cbor2.loads(hv.tag(258, hv.array(hv.uint(1), hv.uint(2)))) == {1, 2}
    loop = cbor2.loads(hv.tag(28, hv.array(hv.tag(29, hv.uint(0)))))
    assert loop[0] is loop  # a list that contains itself
    assert cbor2.loads(b"\xf7") is cbor2.undefined
    assert cbor2.loads(hv.simple(255)) == cbor2.CBORSimpleValue(255)
    with pytest.raises(cbor2.CBORDecodeError):
        cbor2.loads(hv.tstr(b"\xff\xfe"))  # invalid UTF-8 in a text string


def test_every_kind_of_item_is_produced() -> None:
    rng = random.Random(3)
    for kind in hv.HOSTILE_KINDS:
        for _ in range(20):
            name, data = hv.hostile_item(rng, kind)
            assert isinstance(name, str) and isinstance(data, bytes) and data


def test_templates_are_valid_and_round_trip() -> None:
    ctx = hv.Context(epoch=7)
    t = hv.templates(ctx)
    for name in (
        "ctl.hb",
        "ctl.vreq",
        "ctl.vres",
        "ctl.app.serve",
        "ctl.app.profile",
        "act.fwd",
        "act.fwd.open",
        "act.tok",
        "act.end",
        "act.err",
        "files",
        "kv",
        "probe.echo",
        "probe.sink",
        "dataplane",
        "plan",
        "profile",
    ):
        assert name in t, name
        assert cbor2.loads(hv.encode(t[name])) == t[name], name
    assert t["plan"]["epoch"] == 7 and t["ctl.hb"]["x"]["plan"] == t["plan"]
    assert t["plan"]["stages"][-1][2] == ctx.num_layers


def test_raw_items_are_spliced_verbatim() -> None:
    data = hv.encode({"a": hv.Raw(hv.decimal_fraction(600_000, 1)), "b": [1, hv.Raw(b"\xf7")]})
    assert cbor2.loads(data) == {"a": Decimal("1E+600000"), "b": [1, cbor2.undefined]}


def test_mutations_are_reproducible_and_spare_fixed_fields() -> None:
    template = hv.templates()["act.fwd.open"]
    first = list(hv.hostile_cases(random.Random(5), template, 200, fixed={"r", "cap"}))
    again = list(hv.hostile_cases(random.Random(5), template, 200, fixed={"r", "cap"}))
    assert first == again
    assert len({c.data for c in first}) > 150
    checked = 0
    for case in first:
        if case.kind.split(" ")[0] not in ("set", "drop", "add", "duplicate"):
            continue  # whole-message, truncation and bit-flip cases are not field-aware
        try:
            msg = cbor2.loads(case.data)
        except cbor2.CBORDecodeError:
            continue  # a malformed item (a length it lacks, say) spoils the whole message
        checked += 1
        assert msg["r"] == template["r"] and msg["cap"] == template["cap"], case.short()
    assert checked > 100
    assert any(c.kind.startswith("set t.input_ids") for c in first)  # nested fields too


def test_payloads_for_a_protocol() -> None:
    out = list(hv.hostile_payloads(random.Random(1), "files", 50))
    assert len(out) == 50 and all(isinstance(b, bytes) for b in out)
    name, data = hv.frame_attacks(random.Random(2), b"\xa0")
    assert name.startswith("frame:") and isinstance(data, bytes)


@settings(max_examples=50, deadline=None)
@given(hv.hostile_cbor(hv.templates()["ctl.hb"]))
def test_hypothesis_strategy_gives_bytes(data: bytes) -> None:
    assert isinstance(data, bytes)
