"""Property-based fuzzing of every decoder that reads bytes or objects from another process.

Each decoder promises one error type for bad input (``BadFrame``, ``FrameError``/``EOFError``,
``BadMessage``, ``ControlError``, ``ProfileError``, ``PlanError``); anything else escaping is a
crash a misbehaving or malicious peer could trigger. Pure random bytes rarely get past the first
check, so most strategies start from valid encodings and mutate them, or build structures of the
right outer shape with garbage inside.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.control.protocol import VERSION, ControlError, Request, error, parse_request
from meshllm.mesh.ctlmsg import BadMessage, decode_message, encode_message
from meshllm.mesh.framing import BlockingFrameReader, FrameError, FrameReader, frame
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.frames import (
    DTYPES,
    END,
    ERROR,
    FWD,
    MAX_TENSORS,
    TOKEN,
    BadFrame,
    Frame,
    KVSource,
    decode_frame,
    encode_frame,
)
from meshllm.pipeline.plan import Plan, PlanError, Stage
from meshllm.plan.profile import LinkStats, Profile, ProfileError


def fuzz(n: int) -> Callable[[Any], Any]:
    """*n* examples, no deadline. Counts are sized so the file runs in about 40 s on 2 cores:
    cheap byte-level tests get more, tests that build nested structures fewer."""
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- shared strategies ---------------------------------------------------------------------------

# Integers at the edges the decoders check (sign, 2**31, 2**62, 2**64) plus bignums whose repr()
# or float() fails in Python (over 4300 digits, over 1e308).
edge_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 2**31 - 1, 2**31, 2**62 - 1, 2**62, 2**64, 10**400]),
    # Built lazily: hypothesis repr()s sampled_from's elements, which fails for this one.
    st.builds(lambda: -(10**5000)),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    edge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
# CBOR-ish values: what cbor2.dumps accepts, nested.
cbor_values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=8), edge_ints), kids, max_size=6),
    ),
    max_leaves=30,
)
# What a peer may really send: no bignums (CBOR tags, which every decoder refuses), string keys.
plain_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=40),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=30,
)
# JSON-ish values: what json.dumps accepts (string keys), nested. Decoded objects (profiles,
# plans) may hold any int; request lines get their bignums as raw digits (json.dumps refuses).
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), edge_ints, st.floats(allow_nan=True), st.text(max_size=20)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=30,
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """*base* with a few random edits: flipped bytes, truncation, insertion, self-splicing."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "splice" and data:
            a = draw(st.integers(0, len(data) - 1))
            b = draw(st.integers(a, len(data)))
            data[pos:pos] = data[a:b]
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def mutations_of(encodings: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return encodings.flatmap(mutated)


@st.composite
def replace_fields(draw: st.DrawFn, obj: dict[Any, Any]) -> dict[Any, Any]:
    """*obj* with some fields replaced by garbage, some deleted and some junk ones added."""
    out = dict(obj)
    for key in draw(st.lists(st.sampled_from(sorted(out, key=str)), max_size=3)) if out else []:
        if draw(st.booleans()):
            out[key] = draw(cbor_values)
        else:
            out.pop(key, None)
    out.update(draw(st.dictionaries(st.text(max_size=4), cbor_values, max_size=2)))
    return out


# -- pipeline frames -----------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    # Raw bytes, not values: any bit pattern (NaNs included) must survive byte for byte.
    data = draw(
        st.binary(
            min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize
        )
    )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


finite = st.floats(allow_nan=False, allow_infinity=False)
seconds = st.floats(0.0, 1e9)
peer_ids = st.text("abcXYZ0189-_", min_size=1, max_size=60)
u62 = st.integers(0, 2**62 - 1)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """A valid frame, with only the fields its kind carries on the wire."""
    kind = draw(st.sampled_from([FWD, TOKEN, END, ERROR]))
    f = Frame(
        kind=kind,
        rid=draw(st.text(min_size=1, max_size=64)),
        epoch=draw(u62),
        step=draw(u62),
        compute_s=draw(st.lists(seconds, max_size=8)),
        sent_at=draw(seconds),
    )
    if kind == FWD:
        f.pos = draw(st.integers(1, 2**62 - 1))
        f.new = draw(st.integers(1, f.pos))
        f.cap = draw(u62)
        f.coord = draw(peer_ids)
        f.sampling = draw(
            st.one_of(
                st.just({}),
                st.builds(
                    lambda t, k, p, seed: SamplingParams(t, k, p, seed).to_wire(),
                    st.floats(0.0, 100.0),
                    st.integers(0, 2**31 - 1),
                    st.floats(0.01, 1.0),
                    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                ),
            )
        )
        f.tensors = draw(st.dictionaries(st.text(max_size=8), tensors(), max_size=MAX_TENSORS))
        if f.cap and f.pos > 1 and draw(st.booleans()):
            stage = st.tuples(peer_ids, st.integers(0, 2**19), st.integers(1, 2**19))
            stages = [(p, a, a + b) for p, a, b in draw(st.lists(stage, min_size=1, max_size=4))]
            f.kv_from = KVSource(
                draw(u62),
                tuple(stages),
                draw(st.integers(1, min(f.pos - 1, 2**31 - 1))),
                draw(st.integers(0, 2**31 - 1)),
            )
    elif kind == TOKEN:
        f.token = draw(u62)
    elif kind == ERROR:
        f.error = draw(st.text(max_size=2000))
    elif kind == END:
        f.coord = draw(st.text(max_size=60))
    return f


@fuzz(300)
@given(frames())
def test_frame_round_trip(f: Frame) -> None:
    g = decode_frame(encode_frame(f))
    for name in (
        "kind",
        "rid",
        "epoch",
        "step",
        "pos",
        "new",
        "cap",
        "coord",
        "sampling",
        "token",
        "error",
        "compute_s",
        "sent_at",
        "kv_from",
    ):
        assert getattr(g, name) == getattr(f, name), name
    assert g.tensors.keys() == f.tensors.keys()
    for k, a in f.tensors.items():
        b = g.tensors[k]
        assert (b.dtype, b.shape, b.tobytes()) == (a.dtype, a.shape, a.tobytes())


def check_frame(data: bytes) -> None:
    with contextlib.suppress(BadFrame):  # the one error it may raise
        decode_frame(data)


@fuzz(2000)
@given(st.binary(max_size=200))
def test_decode_frame_random_bytes(data: bytes) -> None:
    check_frame(data)


@fuzz(1500)
@given(mutations_of(frames().map(encode_frame)))
def test_decode_frame_mutated(data: bytes) -> None:
    check_frame(data)


@st.composite
def bad_tensor(draw: st.DrawFn) -> Any:
    """[dtype, shape, data] with each part possibly wrong: unknown dtypes, negative or huge
    dimensions (whose product may overflow 64 bits), byte lengths off by a little."""
    dtype = draw(st.one_of(st.sampled_from([*DTYPES, "float64", "object", "<f4"]), cbor_values))
    shape = draw(
        st.one_of(
            st.lists(
                st.one_of(st.integers(-2, 8), edge_ints, st.sampled_from([2**30, 2**31 - 1])),
                max_size=6,
            ),
            cbor_values,
        )
    )
    size = 0
    if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 64 for d in shape):
        size = math.prod(shape) * 4
    nbytes = max(0, size + draw(st.integers(-3, 3)))
    data = draw(st.one_of(st.just(b"\0" * min(nbytes, 4096)), cbor_values))
    parts = [dtype, shape, data]
    return draw(
        st.one_of(st.just(parts), st.lists(st.sampled_from(parts), max_size=4), cbor_values)
    )


@st.composite
def frame_objects(draw: st.DrawFn) -> dict[Any, Any]:
    """The decoded map of a valid frame with garbage fields and garbage tensors swapped in."""
    obj = cbor2.loads(encode_frame(draw(frames())))
    if obj["k"] == FWD and draw(st.booleans()):
        obj["t"] = draw(
            st.dictionaries(st.one_of(st.text(max_size=4), edge_ints), bad_tensor(), max_size=3)
        )
    return draw(replace_fields(obj))


@fuzz(1000)
@given(frame_objects())
def test_decode_frame_wrong_shapes(obj: dict[Any, Any]) -> None:
    check_frame(cbor2.dumps(obj))


@fuzz(800)
@given(cbor_values)
def test_decode_frame_arbitrary_cbor(obj: Any) -> None:
    check_frame(cbor2.dumps(obj))


@pytest.mark.parametrize(
    "t",
    [
        # 2**90 elements: the product wraps to 0 in int64, which matches b"" if done in numpy.
        ["float32", [2**30, 2**30, 2**30, 1], b""],
        ["float32", [2**31 - 1] * 4, b""],
        ["int64", [-1], b""],
        ["float16", [3], b"\0" * 5],
        ["float32", [10**5000], b""],  # repr() of this shape fails in Python
    ],
    ids=["wraps-to-zero", "max-dims", "negative", "short-data", "bignum-dim"],
)
def test_decode_frame_bad_tensors(t: list[Any]) -> None:
    obj = {"k": FWD, "r": "x", "e": 0, "s": 0, "p": 1, "n": 1, "c": "coord", "t": {"x": t}}
    with pytest.raises(BadFrame):
        decode_frame(cbor2.dumps(obj))


@pytest.mark.parametrize(
    "patch",
    [{"cs": [10**400]}, {"at": 10**400}, {"k": 10**5000}, {"t": {10**5000: []}}, {"e": -1}],
    ids=["huge-timing", "huge-timestamp", "bignum-kind", "bignum-tensor-name", "negative-epoch"],
)
def test_decode_frame_bignums(patch: dict[str, Any]) -> None:
    obj = {"k": FWD, "r": "x", "e": 0, "s": 0, "p": 1, "n": 1, "c": "coord", "t": {}, **patch}
    with pytest.raises(BadFrame):
        decode_frame(cbor2.dumps(obj))


# -- length-prefixed framing ---------------------------------------------------------------------


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never really suspends (our fake reads complete at once): far
    cheaper per example than a trio.run, and a suspension would be a bug in the test."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the reader suspended on a fake stream that never blocks")


def chunked_reader(data: bytes, cuts: list[int]) -> Callable[[int], Coroutine[Any, Any, bytes]]:
    """A ``read(n)`` over *data* that returns the pieces between *cuts* (never more than n),
    then b"" forever, like a socket at EOF."""
    bounds = sorted({c for c in cuts if 0 < c < len(data)} | {len(data)})
    state = {"pos": 0}

    async def read(n: int) -> bytes:
        assert n > 0
        pos = state["pos"]
        end = next((b for b in bounds if b > pos), pos)
        chunk = data[pos : min(end, pos + n)]
        state["pos"] = pos + len(chunk)
        return chunk

    return read


MAX = 1000
payloads = st.lists(st.binary(max_size=MAX // 4), max_size=6)


@fuzz(1000)
@given(payloads, st.lists(st.integers(0, 2000), max_size=30))
def test_frame_reader_chunk_boundaries(frames_in: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in frames_in)
    reader = FrameReader(chunked_reader(stream, cuts), MAX)
    assert [run_now(reader.read_frame()) for _ in frames_in] == frames_in
    with pytest.raises(EOFError):
        run_now(reader.read_frame())


@fuzz(1000)
@given(payloads.filter(bool), st.lists(st.integers(0, 2000), max_size=30), st.data())
def test_frame_reader_truncated(
    frames_in: list[bytes], cuts: list[int], data: st.DataObject
) -> None:
    stream = b"".join(frame(p) for p in frames_in)
    cut = data.draw(st.integers(0, len(stream) - 1))
    reader = FrameReader(chunked_reader(stream[:cut], cuts), MAX)
    got: list[bytes] = []
    with pytest.raises(EOFError):
        while True:
            got.append(run_now(reader.read_frame()))
    # Whatever came out before the cut is a prefix of what was sent, never a partial frame.
    assert got == frames_in[: len(got)]


@fuzz(1000)
@given(payloads, st.integers(MAX + 1, 2**32 - 1), st.binary(max_size=50))
def test_frame_reader_oversized(frames_in: list[bytes], size: int, tail: bytes) -> None:
    stream = b"".join(frame(p) for p in frames_in) + struct.pack(">I", size) + tail
    reader = FrameReader(chunked_reader(stream, [3, 7, 11]), MAX)
    for p in frames_in:
        assert run_now(reader.read_frame()) == p
    # Refused from the header alone: the reader must not wait for (or buffer) 4 GiB first.
    with pytest.raises(FrameError):
        run_now(reader.read_frame())


@fuzz(1500)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_frame_reader_random_stream(stream: bytes, cuts: list[int]) -> None:
    reader = FrameReader(chunked_reader(stream, cuts), 64)
    with pytest.raises((EOFError, FrameError)):
        for _ in range(len(stream) + 1):  # every frame eats >= 4 bytes: this must end
            assert len(run_now(reader.read_frame())) <= 64


def _sync_reader(read: Any) -> Any:
    return lambda n: run_now(read(n))


def _drain(read_frame: Any) -> tuple[list[bytes], str]:
    got: list[bytes] = []
    try:
        for _ in range(10_000):
            got.append(read_frame())
    except (EOFError, FrameError) as exc:
        return got, type(exc).__name__
    raise AssertionError("the reader never stopped")


@fuzz(1000)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20), st.data())
def test_blocking_frame_reader_reads_what_the_async_one_reads(
    tail: bytes, cuts: list[int], data: st.DataObject
) -> None:
    frames_in = data.draw(payloads)
    stream = b"".join(frame(p) for p in frames_in) + tail
    async_reader = FrameReader(chunked_reader(stream, cuts), MAX)
    want = _drain(lambda: run_now(async_reader.read_frame()))
    blocking = BlockingFrameReader(_sync_reader(chunked_reader(stream, cuts)), MAX)
    assert _drain(blocking.read_frame) == want
    assert want[0][: len(frames_in)] == frames_in


# -- mesh control messages -----------------------------------------------------------------------


addr_texts = st.text("/ip4tc0-9", min_size=1, max_size=6)
valid_messages = st.one_of(
    st.builds(
        lambda t, r, m, x: encode_message(
            "hb", t, role=r, leader=None, name="p", addrs=["/ip4/1"], members=m, x=x
        ),
        u62,
        st.sampled_from(["follower", "candidate", "leader"]),
        st.dictionaries(peer_ids, st.lists(addr_texts, max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=6), plain_values, max_size=3),
    ),
    st.builds(lambda t: encode_message("vreq", t), u62),
    st.builds(lambda t, g: encode_message("vres", t, granted=g), u62, st.booleans()),
    st.builds(
        lambda t, b: encode_message("app", t, body=b),
        u62,
        st.dictionaries(st.text(max_size=6), plain_values, max_size=3),
    ),
)


def check_message(data: bytes) -> None:
    with contextlib.suppress(BadMessage):  # the one error it may raise
        decode_message(data)


@fuzz(300)
@given(valid_messages)
def test_decode_message_accepts_valid(data: bytes) -> None:
    assert decode_message(data)["t"] == cbor2.loads(data)["t"]


@fuzz(1500)
@given(st.one_of(st.binary(max_size=200), mutations_of(valid_messages)))
def test_decode_message_bytes(data: bytes) -> None:
    check_message(data)


@fuzz(800)
@given(st.one_of(valid_messages.map(cbor2.loads).flatmap(replace_fields), cbor_values))
def test_decode_message_wrong_shapes(obj: Any) -> None:
    check_message(cbor2.dumps(obj))


@pytest.mark.parametrize("t", [10**5000, b"x", None, 1.5], ids=["bignum", "bytes", "none", "float"])
def test_decode_message_odd_types(t: Any) -> None:
    with pytest.raises(BadMessage):
        decode_message(cbor2.dumps({"v": 1, "t": t, "term": 0}))


# -- control socket requests ---------------------------------------------------------------------


def check_request(line: bytes) -> None:
    """What the server does with a line: a Request, or a ControlError it turns into a reply."""
    try:
        req = parse_request(line)
    except ControlError as err:
        assert err.code in ("bad_json", "bad_request", "unsupported_version")
        assert error(None, err).endswith(b"\n")
    else:
        assert isinstance(req, Request) and isinstance(req.op, str) and req.op


dumpable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=30,
)
valid_requests = st.builds(
    lambda i, op, a: json.dumps({"v": VERSION, "id": i, "op": op, "args": a}).encode(),
    dumpable,
    st.text(min_size=1, max_size=10),
    st.dictionaries(st.text(max_size=6), dumpable, max_size=3),
)
# Numbers json.loads refuses beyond the parser: over 4300 digits, in any field.
huge_number_lines = st.builds(
    lambda field, n: f'{{"v": 1, "op": "status", "{field}": {"7" * n}}}'.encode(),
    st.sampled_from(["v", "id", "op", "args"]),
    st.integers(4000, 6000),
)
deep_lines = st.integers(1, 5000).map(
    lambda n: b'{"v": 1, "op": ' + b"[" * n * 100 + b"]" * n * 100
)


@fuzz(1000)
@given(
    st.one_of(st.binary(max_size=200), mutations_of(valid_requests), huge_number_lines, deep_lines)
)
def test_parse_request_bytes(line: bytes) -> None:
    check_request(line)


@fuzz(800)
@given(st.one_of(dumpable, st.dictionaries(st.sampled_from(["v", "id", "op", "args"]), dumpable)))
def test_parse_request_wrong_shapes(obj: Any) -> None:
    check_request(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "line",
    [
        b'{"v": 1, "op": "status", "id": ' + b"9" * 5000 + b"}",  # over Python's int limit
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the recursion limit
        b'{"v": 1e999, "op": "x"}',
        b"\xff\xfe{}",
        b'{"v": 1, "op": "\\ud800"}',  # a lone surrogate
    ],
    ids=["bignum-id", "deep-nesting", "inf-version", "bad-utf8", "lone-surrogate"],
)
def test_parse_request_pathological(line: bytes) -> None:
    check_request(line)


# -- profiles and plans --------------------------------------------------------------------------


def a_profile() -> Profile:
    return Profile(
        "5a" * 32,
        1e-3,
        1e-4,
        2e-4,
        1e-5,
        1e-4,
        2e-3,
        2e-4,
        3e-4,
        2e-4,
        1 << 30,
        False,
        4,
        1.7e9,
        {"peer": LinkStats(1e-3, 1e7)},
    )


def a_plan() -> Plan:
    stages = (Stage("a", 0, 10), Stage("b", 10, 30))
    predicted = {"objective": "x", "step_s": 0.1, "stage_s": [0.1, 0.2], "bottleneck_s": 0.2}
    return Plan(3, "m", "5a" * 32, "a", 30, "even", stages, predicted)


@st.composite
def deep_replace(draw: st.DrawFn, obj: Any, depth: int = 0) -> Any:
    """*obj* with garbage at any depth, so checks nested in lists and maps are reached."""
    if depth > 3 or draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    if isinstance(obj, dict):
        out = {
            k: draw(deep_replace(v, depth + 1)) if draw(st.booleans()) else v
            for k, v in obj.items()
            if draw(st.integers(0, 9))
        }
        return out
    if isinstance(obj, list):
        return [draw(deep_replace(v, depth + 1)) if draw(st.booleans()) else v for v in obj]
    return obj


@fuzz(1000)
@given(st.one_of(deep_replace(a_profile().to_obj()), json_values))
def test_profile_from_obj(obj: Any) -> None:
    with contextlib.suppress(ProfileError):  # the one error it may raise
        Profile.from_obj(obj)


@fuzz(1000)
@given(st.one_of(deep_replace(a_plan().to_obj()), json_values))
def test_plan_from_obj(obj: Any) -> None:
    with contextlib.suppress(PlanError):  # the one error it may raise
        Plan.from_obj(obj)


def test_profile_and_plan_round_trip() -> None:
    assert Profile.from_obj(a_profile().to_obj()) == a_profile()
    assert Plan.from_obj(a_plan().to_obj()) == a_plan()


@pytest.mark.parametrize(
    "patch",
    [{"layer_s": 10**400}, {"memory_bytes": math.inf}, {"threads": -math.inf}],
    ids=["huge-int-figure", "infinite-memory", "infinite-threads"],
)
def test_profile_overflow(patch: dict[str, Any]) -> None:
    with pytest.raises(ProfileError):
        Profile.from_obj({**a_profile().to_obj(), **patch})


@pytest.mark.parametrize(
    "patch",
    [
        {"epoch": math.inf},
        {"stages": [["a", 0, math.inf]]},
        {"predicted": {"objective": "x", "step_s": 10**400, "stage_s": []}},
    ],
    ids=["infinite-epoch", "infinite-stop", "huge-int-prediction"],
)
def test_plan_overflow(patch: dict[str, Any]) -> None:
    with pytest.raises(PlanError):
        Plan.from_obj({**a_plan().to_obj(), **patch})
