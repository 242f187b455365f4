"""Hostile CBOR at the byte level, for the hostile-peer harness (issue 19).

What a peer can put on the wire is not what ``cbor2.dumps`` of a Python value gives: tags
(bignums, decimal fractions, bigfloats, sets, shared references, unknown numbers), non-minimal
and indefinite-length encodings, length headers that promise more than follows, undefined and
simple values, invalid UTF-8. This module builds such items by hand and splices them into
otherwise valid messages, so decoders meet the values a hostile or buggy peer really sends.

* :func:`hostile_item` returns one hostile item ``(kind, raw CBOR bytes)``; ``HOSTILE_KINDS``
  lists every kind.
* :func:`templates` returns one valid message per protocol (as the daemon's encoders build
  them), and :func:`mutate` turns a template into one hostile message: a field (or nested
  field) replaced by a hostile item, a field dropped, unknown fields added, the whole message
  replaced, wrapped in a tag, truncated or bit-flipped.
* :func:`sweep` sets every field of a template in turn to hostile items (and drops it).
* :func:`hostile_cases` / :func:`hostile_payloads` produce many of them from a seeded
  ``random.Random`` (for tests against real processes, where hypothesis is awkward), and
  :func:`hostile_cbor` is the same as a hypothesis strategy.
* :func:`frame_attacks` gives framing-level attacks (length headers over the limit, frames
  cut short) around a payload.

Pure: no meshllm imports. The protocols' shapes are copied from their encoders
(meshllm/mesh/node.py, pipeline/frames.py, files.py, kvmove.py, profiling.py, plan.py,
plan/profile.py, mesh/p2p.py); keep them in step when a protocol changes.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cbor2

# -- raw CBOR ------------------------------------------------------------------------------

UINT, NINT, BYTES, TEXT, ARRAY, MAP, TAG, SIMPLE = range(8)
BREAK = b"\xff"


def head(major: int, arg: int, width: int | None = None) -> bytes:
    """An item head: major type and argument, in the shortest form unless *width* (0, 1, 2,
    4 or 8 bytes of argument) forces a longer, non-canonical one."""
    if width is None:
        width = (
            0
            if arg < 24
            else 1
            if arg < 1 << 8
            else 2
            if arg < 1 << 16
            else 4
            if arg < 1 << 32
            else 8
        )
    if width == 0:
        assert arg < 24
        return bytes([major << 5 | arg])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | ai]) + arg.to_bytes(width, "big")


def indefinite(major: int) -> bytes:
    """The head of an indefinite-length byte string, text string, array or map."""
    return bytes([major << 5 | 31])


def uint(n: int) -> bytes:
    return head(UINT, n)


def nint(n: int) -> bytes:
    """The negative integer *n* (-2**64 <= n < 0)."""
    return head(NINT, -1 - n)


def bstr(b: bytes) -> bytes:
    return head(BYTES, len(b)) + b


def tstr(s: str | bytes) -> bytes:
    """A text string; *s* as bytes is put in verbatim (invalid UTF-8 included)."""
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return head(TEXT, len(raw)) + raw


def array(*items: bytes) -> bytes:
    return head(ARRAY, len(items)) + b"".join(items)


def cmap(*pairs: tuple[bytes, bytes]) -> bytes:
    """A map from encoded (key, value) pairs: duplicate keys and any key type allowed."""
    return head(MAP, len(pairs)) + b"".join(k + v for k, v in pairs)


def tag(number: int, item: bytes) -> bytes:
    return head(TAG, number) + item


def bignum(n: int) -> bytes:
    """Tag 2 (n >= 0) or tag 3 (n < 0) with the magnitude's bytes, whatever its size."""
    m = n if n >= 0 else -1 - n
    return tag(2 if n >= 0 else 3, bstr(m.to_bytes(max(1, (m.bit_length() + 7) // 8), "big")))


def integer(n: int) -> bytes:
    """Any Python int: as a plain integer where one fits, else as a bignum."""
    if 0 <= n < 1 << 64:
        return uint(n)
    if -(1 << 64) <= n < 0:
        return nint(n)
    return bignum(n)


def decimal_fraction(exponent: int, mantissa: int) -> bytes:
    """Tag 4: mantissa * 10**exponent (e.g. (600000, 1) is 1E+600000)."""
    return tag(4, array(integer(exponent), integer(mantissa)))


def bigfloat(exponent: int, mantissa: int) -> bytes:
    """Tag 5: mantissa * 2**exponent."""
    return tag(5, array(integer(exponent), integer(mantissa)))


def half(bits: int) -> bytes:
    return b"\xf9" + struct.pack(">H", bits)


def single(x: float) -> bytes:
    return b"\xfa" + struct.pack(">f", x)


def double(x: float) -> bytes:
    return b"\xfb" + struct.pack(">d", x)


def simple(n: int) -> bytes:
    """Simple value *n* (20-23 are false/true/null/undefined; 24-31 in two bytes are invalid)."""
    return bytes([0xE0 | n]) if n < 24 else b"\xf8" + bytes([n])


def deep_array(depth: int, leaf: bytes = b"\x00") -> bytes:
    return b"\x81" * depth + leaf


def deep_map(depth: int, leaf: bytes = b"\x00") -> bytes:
    return b"\xa1\x61a" * depth + leaf


def deep_indefinite(depth: int) -> bytes:
    return b"\x9f" * depth + b"\x00" + BREAK * depth


def deep_tags(depth: int, number: int = 1234, leaf: bytes = b"\x00") -> bytes:
    return head(TAG, number) * depth + leaf


def claims_length(major: int, length: int, follow: bytes = b"abc") -> bytes:
    """A string/array/map head claiming *length* (up to 2**64-1) with only *follow* after it."""
    return head(major, length, width=8) + follow


@dataclass(frozen=True)
class Raw:
    """Bytes put into an :func:`encode`-d structure verbatim, as one CBOR item."""

    data: bytes


def encode(obj: Any) -> bytes:
    """CBOR of *obj*, with :class:`Raw` items spliced in as they are. Containers are written
    here (definite length, keys in the dict's order); leaves go through ``cbor2.dumps``."""
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, dict):
        return head(MAP, len(obj)) + b"".join(encode(k) + encode(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return head(ARRAY, len(obj)) + b"".join(encode(v) for v in obj)
    return cbor2.dumps(obj)


# -- randomness, from random.Random or from hypothesis ---------------------------------------


class Chooser(Protocol):
    """What the generators need of a source of choices: ``random.Random`` has it, and so
    does :class:`_Draws` (hypothesis draws, which shrink)."""

    def randrange(self, start: int, stop: int | None = ...) -> int: ...

    def random(self) -> float: ...

    def randbytes(self, n: int) -> bytes: ...


def _choice(rng: Chooser, seq: Sequence[Any]) -> Any:
    return seq[rng.randrange(len(seq))]


# -- hostile items -------------------------------------------------------------------------

HEX64_NUL = "ab" * 31 + "a\x00"
_BIG = 10**5000 - 1  # 5000 digits: repr()/str() raise ValueError past 4300
_BIG_BYTES = (_BIG.bit_length() + 7) // 8

# Strings a path, a model hash or a peer id must never be.
HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    "\x00",
    "a\x00b",
    HEX64_NUL,
    "/",
    "..",
    "../",
    "../../escaped",
    "../" * 12 + "tmp/meshllm-escaped",
    "./.",
    "a/../../b",
    "/dev/null/x",  # absolute, and never creatable
    "/proc/self/x",
    "segments/0-1",
    "C:\\Windows\\x",
    "g" * 64,  # 64 characters, not hex
    "AB" * 32,  # hex, not lower case
    "ab" * 31 + "a/",
    "ab" * 32 + "\n",
    " " + "ab" * 31 + "a",
    "ab" * 33,  # 66 hex characters
    "\u202e\r\n\x1b[31m",  # direction override, CR LF, terminal escape
    "\ud800",  # a lone surrogate (written as its 3 raw bytes: invalid UTF-8)
    "é" * 300,
    "x" * 513,
    "x" * 4097,
)
# Sizes of over-long strings: past every limit a decoder might have, under the 1 MiB frame.
LONG_SIZES = (64, 65, 256, 513, 4096, 65537, 600_000)


def _hostile_string(rng: Chooser) -> tuple[str, bytes]:
    i = rng.randrange(len(HOSTILE_STRINGS) + 3)
    if i < len(HOSTILE_STRINGS):
        s = HOSTILE_STRINGS[i]
        return f"str:{s[:24]!r}", tstr(s)
    if i == len(HOSTILE_STRINGS):
        n = _choice(rng, LONG_SIZES)
        return f"str-long:{n}", tstr("x" * n)
    if i == len(HOSTILE_STRINGS) + 1:
        return "str-bad-utf8", tstr(b"\xff\xfe\xc3(" + rng.randbytes(rng.randrange(8)))
    return "str-random-utf8", tstr("".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(8)))


def _hostile_int(rng: Chooser) -> tuple[str, bytes]:
    values = (
        -1,
        -(2**31),
        -(2**63),
        -(2**64),
        2**31,
        2**32,
        2**53 + 1,
        2**62,
        2**63,
        2**64 - 1,
    )
    i = rng.randrange(len(values) + 2)
    if i < len(values):
        return f"int:{values[i]}", integer(values[i])
    if i == len(values):
        return "int-wide-encoding", head(UINT, rng.randrange(24), width=8)  # non-minimal
    return "int:random", integer(rng.randrange(-(2**70), 2**70))


def _hostile_bignum(rng: Chooser) -> tuple[str, bytes]:
    i = rng.randrange(7)
    if i == 0:
        return "bignum:+5000-digits", bignum(_BIG)
    if i == 1:
        return "bignum:-5000-digits", bignum(-_BIG - 1)
    if i == 2:
        return "bignum:2**64", bignum(2**64)
    if i == 3:
        return "bignum:-2**64-1", bignum(-(2**64) - 1)
    if i == 4:
        return "bignum:zero-bytes", tag(2, bstr(b""))  # 0, spelt as a bignum
    if i == 5:
        return "bignum:leading-zeros", tag(2, bstr(b"\0" * 16 + b"\x05"))  # 5, spelt oddly
    return "bignum:1e308-plus", bignum(10**309)  # float() of it overflows


def _hostile_decimal(rng: Chooser) -> tuple[str, bytes]:
    choices = (
        ("decimal:1E+600000", (600_000, 1)),  # int() of it holds the GIL for ~10 s
        ("decimal:1E+999999", (999_999, 1)),  # the largest cbor2 lets through the context
        ("decimal:1E+100000000", (100_000_000, 1)),  # int() of it: minutes and gigabytes
        ("decimal:1E+999999999999999999", (999_999_999_999_999_999, 1)),
        ("decimal:1E-600000", (-600_000, 1)),
        ("decimal:5", (0, 5)),  # an integral value, but a Decimal
        ("decimal:1.5", (-1, 15)),
        ("decimal:-1E+30", (30, -1)),
        ("decimal:bignum-mantissa", (0, _BIG)),
    )
    name, (e, m) = _choice(rng, choices)
    return name, decimal_fraction(e, m)


def _hostile_bigfloat(rng: Chooser) -> tuple[str, bytes]:
    name, (e, m) = _choice(
        rng,
        (
            ("bigfloat:2**600000", (600_000, 1)),
            ("bigfloat:2**3000000", (3_000_000, 1)),
            ("bigfloat:3*2**-1000", (-1000, 3)),
            ("bigfloat:2**40", (40, 1)),
            ("bigfloat:huge-exponent", (2**40, 1)),
        ),
    )
    return name, bigfloat(e, m)


_FLOATS: tuple[tuple[str, bytes], ...] = (
    ("f16:nan", half(0x7E00)),
    ("f16:nan-payload", half(0x7C01)),
    ("f16:+inf", half(0x7C00)),
    ("f16:-inf", half(0xFC00)),
    ("f16:-0", half(0x8000)),
    ("f16:subnormal", half(0x0001)),
    ("f32:nan", single(math.nan)),
    ("f32:+inf", single(math.inf)),
    ("f32:-inf", single(-math.inf)),
    ("f64:nan", double(math.nan)),
    ("f64:nan-payload", b"\xfb\x7f\xf8\x00\x00\x00\x00\xbe\xef"),
    ("f64:+inf", double(math.inf)),
    ("f64:-inf", double(-math.inf)),
    ("f64:1e308", double(1e308)),
    ("f64:-1e308", double(-1e308)),
    ("f64:5e-324", double(5e-324)),
    ("f64:1.5", double(1.5)),
    ("f64:1.0", double(1.0)),  # integral, but a float
    ("f64:-1.0", double(-1.0)),
    ("f64:2**63", double(2.0**63)),
)


def _hostile_float(rng: Chooser) -> tuple[str, bytes]:
    return _choice(rng, _FLOATS)


_SIMPLE: tuple[tuple[str, bytes], ...] = (
    ("false", b"\xf4"),
    ("true", b"\xf5"),
    ("null", b"\xf6"),
    ("undefined", b"\xf7"),
    ("simple:0", simple(0)),
    ("simple:19", simple(19)),
    ("simple:32", simple(32)),
    ("simple:255", simple(255)),
    ("simple:invalid-two-byte", b"\xf8\x10"),
)


def _hostile_simple(rng: Chooser) -> tuple[str, bytes]:
    return _choice(rng, _SIMPLE)


def _hostile_bytes(rng: Chooser) -> tuple[str, bytes]:
    i = rng.randrange(5)
    if i == 0:
        return "bytes:empty", bstr(b"")
    if i == 1:
        return "bytes:text-as-bytes", bstr(b"ab" * 32)
    if i == 2:
        return "bytes:nul", bstr(b"\0" * rng.randrange(1, 80))
    if i == 3:
        return "bytes:random", bstr(rng.randbytes(rng.randrange(1, 200)))
    return "bytes:long", bstr(b"\x01" * _choice(rng, LONG_SIZES))


def _hostile_length(rng: Chooser) -> tuple[str, bytes]:
    """Heads that promise far more than follows."""
    major = _choice(rng, (BYTES, TEXT, ARRAY, MAP))
    length = _choice(rng, (2**63, 2**64 - 1, 2**32 - 1, 2**31, 1 << 20, 100_000))
    names = {BYTES: "bytes", TEXT: "text", ARRAY: "array", MAP: "map"}
    return f"len:{names[major]}-claims-{length}", claims_length(major, length)


def _hostile_nesting(rng: Chooser) -> tuple[str, bytes]:
    depth = _choice(rng, (10_000, 10_000, 399, 200, 100_000))
    i = rng.randrange(4)
    if i == 0:
        return f"deep:array-{depth}", deep_array(depth)
    if i == 1:
        return f"deep:map-{depth}", deep_map(depth)
    if i == 2:
        return f"deep:indefinite-{depth}", deep_indefinite(depth)
    return f"deep:tags-{depth}", deep_tags(depth)


def _hostile_tag(rng: Chooser) -> tuple[str, bytes]:
    options: tuple[tuple[str, bytes], ...] = (
        ("tag:1234", tag(1234, uint(0))),
        ("tag:1234-text", tag(1234, tstr("ab" * 32))),
        ("tag:2**64-1", head(TAG, 2**64 - 1) + uint(1)),
        ("tag:55799-self-describe", tag(55799, cmap())),  # decodes to a frozendict, not a dict
        ("tag:55799-int", tag(55799, uint(1))),
        ("tag:258-set", tag(258, array(uint(1), uint(2)))),
        ("tag:258-set-of-text", tag(258, array(tstr("a"), tstr("b")))),
        ("tag:258-set-of-lists", tag(258, array(array(), array(uint(1))))),
        # A list that contains itself (shareable 28, shared reference 29).
        ("tag:28-29-self-list", tag(28, array(tag(29, uint(0))))),
        ("tag:28-29-self-map", tag(28, cmap((tstr("a"), tag(29, uint(0)))))),
        ("tag:29-dangling", tag(29, uint(7))),
        ("tag:28-twice", array(tag(28, tstr("x")), tag(29, uint(0)), tag(29, uint(0)))),
        ("tag:0-date", tag(0, tstr("2024-01-01T00:00:00Z"))),
        ("tag:0-bad-date", tag(0, tstr("not a date"))),
        ("tag:1-epoch", tag(1, uint(1_700_000_000))),
        ("tag:1-huge-epoch", tag(1, integer(2**63))),
        ("tag:1-inf", tag(1, double(math.inf))),
        ("tag:2-on-text", tag(2, tstr("a"))),
        ("tag:4-on-text", tag(4, tstr("a"))),
        ("tag:4-short-array", tag(4, array(uint(1)))),
        ("tag:30-rational", tag(30, array(uint(1), uint(3)))),
        ("tag:30-zero-denominator", tag(30, array(uint(1), uint(0)))),
        ("tag:35-regex", tag(35, tstr("(a+)+$"))),
        ("tag:35-bad-regex", tag(35, tstr("(a"))),
        ("tag:36-mime", tag(36, tstr("Content-Type: text/plain\r\n\r\nhi"))),
        ("tag:37-uuid", tag(37, bstr(bytes(range(16))))),
        ("tag:37-bad-uuid", tag(37, bstr(b"a"))),
        ("tag:260-ip", tag(260, bstr(b"\x7f\x00\x00\x01"))),
        ("tag:261-network", tag(261, cmap((bstr(b"\x7f\x00\x00\x00"), uint(8))))),
        ("tag:256-stringref", tag(256, array(tstr("abc"), tag(25, uint(0))))),
        ("tag:25-outside-namespace", tag(25, uint(0))),
        ("tag:21-expected-base64", tag(21, bstr(b"\0\1"))),
        ("tag:24-embedded-cbor", tag(24, bstr(b"\xa0"))),
        ("tag:24-embedded-garbage", tag(24, bstr(b"\xff\xff"))),
    )
    return _choice(rng, options)


def _hostile_indefinite(rng: Chooser) -> tuple[str, bytes]:
    options: tuple[tuple[str, bytes], ...] = (
        ("indef:text", indefinite(TEXT) + tstr("ab") + tstr("cd") + BREAK),
        ("indef:text-with-int", indefinite(TEXT) + uint(1) + BREAK),
        ("indef:bytes", indefinite(BYTES) + bstr(b"ab") + BREAK),
        ("indef:array", indefinite(ARRAY) + uint(1) + uint(2) + BREAK),
        ("indef:map", indefinite(MAP) + tstr("a") + uint(1) + BREAK),
        ("indef:map-odd", indefinite(MAP) + tstr("a") + BREAK),
        ("indef:unterminated", indefinite(ARRAY) + uint(1)),
        ("indef:break-alone", BREAK),
        ("indef:int", b"\x1f"),  # indefinite-length integer: not well-formed
        ("reserved:ai-28", b"\x1c"),
        ("reserved:ai-30", b"\x7e"),
    )
    return _choice(rng, options)


def _hostile_container(rng: Chooser) -> tuple[str, bytes]:
    i = rng.randrange(10)
    if i == 0:
        return "map:empty", cmap()
    if i == 1:
        return "array:empty", array()
    if i == 2:
        return "map:int-keys", cmap((uint(1), uint(2)), (nint(-1), tstr("x")))
    if i == 3:
        return "map:bignum-key", cmap((bignum(_BIG), uint(1)))
    if i == 4:
        return "map:list-key", cmap((array(uint(1)), uint(1)))
    if i == 5:
        return "map:nan-key", cmap((double(math.nan), uint(1)))
    if i == 6:
        return "map:duplicate-keys", cmap((tstr("a"), uint(1)), (tstr("a"), tstr("b")))
    if i == 7:
        n = _choice(rng, (300, 5000, 50_000))
        return f"array:{n}-items", head(ARRAY, n) + b"\x00" * n
    if i == 8:
        n = _choice(rng, (300, 5000, 30_000))
        return f"map:{n}-items", head(MAP, n) + b"".join(tstr(f"k{j}") + b"\x00" for j in range(n))
    return "array:of-hostile", array(*(hostile_item(rng, depth=1)[1] for _ in range(3)))


def _hostile_random(rng: Chooser) -> tuple[str, bytes]:
    return "random-bytes", rng.randbytes(rng.randrange(1, 64))


_GENERATORS: dict[str, Callable[[Chooser], tuple[str, bytes]]] = {
    "string": _hostile_string,
    "int": _hostile_int,
    "bignum": _hostile_bignum,
    "decimal": _hostile_decimal,
    "bigfloat": _hostile_bigfloat,
    "float": _hostile_float,
    "simple": _hostile_simple,
    "bytes": _hostile_bytes,
    "length": _hostile_length,
    "nesting": _hostile_nesting,
    "tag": _hostile_tag,
    "indefinite": _hostile_indefinite,
    "container": _hostile_container,
    "random": _hostile_random,
}
HOSTILE_KINDS: tuple[str, ...] = tuple(_GENERATORS)
# Kinds whose items stay well-formed CBOR (the message around them still decodes), so a
# decoder's *validation* is what meets them, not cbor2's parser.
WELL_FORMED_KINDS: tuple[str, ...] = (
    "string",
    "int",
    "bignum",
    "decimal",
    "bigfloat",
    "float",
    "simple",
    "bytes",
    "tag",
    "container",
)


def hostile_item(rng: Chooser, kind: str | None = None, *, depth: int = 0) -> tuple[str, bytes]:
    """One hostile CBOR item: ``(name, raw bytes)``. *kind* is one of ``HOSTILE_KINDS``
    (random if None); well-formed kinds come up more often than broken encodings."""
    if kind is None:
        pool = WELL_FORMED_KINDS if depth or rng.random() < 0.75 else HOSTILE_KINDS
        kind = _choice(rng, pool)
    return _GENERATORS[kind](rng)


# -- protocol templates ----------------------------------------------------------------------

FAKE_PEERS = (
    "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5",
    "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
    "12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba",
)


@dataclass(frozen=True)
class Context:
    """What makes templates fit one mesh (defaults: a made-up one).

    *peers* are the plan's stage peers in order; *me* is the sender (the hostile peer), whose
    heartbeats and frames the templates are; *source* holds the model. *model_sha* is the
    model's hash, *epoch* the current plan's epoch (a template plan with that epoch is not
    newer than the victim's, so a valid one changes nothing).
    """

    peers: tuple[str, ...] = FAKE_PEERS[:2]
    me: str = FAKE_PEERS[2]
    source: str = FAKE_PEERS[0]
    model: str = "tiny-fp32"
    model_sha: str = "ab" * 32
    num_layers: int = 6
    epoch: int = 1
    addr: str = "/ip4/127.0.0.1/tcp/9/p2p/" + FAKE_PEERS[2]
    # A serve request for a model nobody has: valid in form, so every field is decoded, but
    # it never makes a leader re-plan.
    serve_model: str = "hostile-no-such-model"


def plan_obj(ctx: Context, epoch: int | None = None) -> dict[str, Any]:
    """A plan as ``Plan.to_obj`` writes it: an even split of the model over ``ctx.peers``."""
    n, k = ctx.num_layers, len(ctx.peers)
    cuts = [round(i * n / k) for i in range(k + 1)]
    return {
        "epoch": ctx.epoch if epoch is None else epoch,
        "model": ctx.model,
        "model_sha": ctx.model_sha,
        "source": ctx.source,
        "num_layers": n,
        "partitioner": "even",
        "stages": [[p, cuts[i], cuts[i + 1]] for i, p in enumerate(ctx.peers)],
        "predicted": {
            "objective": "latency",
            "step_s": 0.01,
            "stage_s": [0.005] * k,
            "bottleneck_s": 0.005,
        },
        "balance": "none",
    }


def profile_obj(ctx: Context) -> dict[str, Any]:
    """A profile as ``Profile.to_obj`` writes it."""
    return {
        "model_sha": ctx.model_sha,
        "layer_s": 0.001,
        "first_s": 0.0005,
        "last_s": 0.002,
        "prefill_layer_s": 0.0001,
        "hop_s": 0.0003,
        "idle": [0.001, 0.0005, 0.002, 0.0003],
        "memory_bytes": 1 << 30,
        "memory_exact": False,
        "threads": 1,
        "measured_at": 1_700_000_000.0,
        "links": {p: [0.001, 1.0e8] for p in ctx.peers},
    }


def heartbeat_extra(ctx: Context) -> dict[str, Any]:
    """The serving state a peer puts on its heartbeats (``ServingService.published``)."""
    return {
        "models": {ctx.model: {"sha": ctx.model_sha, "layers": ctx.num_layers}},
        "serving": {"epoch": ctx.epoch, "state": "ready"},
        "rss_mb": 123.5,
        "profile": profile_obj(ctx),
        "profile_errors": {"cd" * 32: "could not profile"},
        "serve_results": {"0123456789abcdef": ctx.epoch, "fedcba9876543210": "no such model"},
        "replan_error": {"epoch": ctx.epoch, "error": "a peer went away"},
        "stage_stats": {"epoch": ctx.epoch, "steps": 10, "baseline_s": 0.01, "recent_s": 0.01},
        "staged": plan_obj(ctx),
        "prepared": ctx.epoch,
        "plan": plan_obj(ctx),
    }


def _ctl(kind: str, **fields: Any) -> dict[str, Any]:
    # node.encode_message; term 0: never newer than the victim's, so it deposes no leader.
    return {"v": 1, "t": kind, "term": 0, **fields}


def _tensor(dtype: str, shape: list[int]) -> list[Any]:
    size = {"float32": 4, "float16": 2, "int64": 8, "int32": 4}[dtype] * math.prod(shape)
    return [dtype, shape, b"\x01" * size]


def templates(ctx: Context | None = None) -> dict[str, dict[str, Any]]:
    """One valid message per protocol, as the daemon's encoders build them.

    Keys: ``ctl.*`` are control messages (length-prefixed on ``/meshllm/ctl/1.0.0``), ``app.*``
    their application bodies inside ``ctl.app``; ``act.*`` activation frames; ``files``,
    ``kv``, ``probe.*``, ``dataplane`` and ``auth.*`` the first frame of those streams, and
    ``files.header``, ``kv.layer``, ``dataplane.offer``, ``auth.reply`` and the like the
    answers a victim gets when it is the one asking; ``plan`` and ``profile`` the objects
    heartbeats carry.
    """
    ctx = ctx or Context()
    coord = ctx.me
    fwd = {
        "k": "fwd",
        "r": "hostile-request-0",
        "e": ctx.epoch,
        "s": 0,
        "p": 1,
        "n": 1,
        "c": coord,
        "t": {"input_ids": _tensor("int64", [1, 1])},
        "cs": [0.001],
        "at": 1_700_000_000.0,
    }
    serve = {
        "kind": "serve",
        "model": ctx.serve_model,
        "partitioner": "even",
        "rid": "0123456789abcdef",
        "objective": "latency",
        "balance": "none",
    }
    profile_req = {"kind": "profile", "sha": "cd" * 32, "source": ctx.source, "refresh": False}
    out: dict[str, dict[str, Any]] = {
        "ctl.hb": _ctl(
            "hb",
            role="follower",
            leader=None,
            name="hostile",
            addrs=[ctx.addr],
            members={FAKE_PEERS[1]: ["/ip4/127.0.0.1/tcp/9/p2p/" + FAKE_PEERS[1]]},
            x=heartbeat_extra(ctx),
            roster={"m": [FAKE_PEERS[1]], "v": [1, 0]},
        ),
        "ctl.vreq": _ctl("vreq", rv=[0, 0]),
        "ctl.vres": _ctl("vres", granted=False),
        "ctl.pvreq": _ctl("pvreq", rv=[0, 0]),
        "ctl.pvres": _ctl("pvres", granted=False),
        "ctl.bye": _ctl("bye", roster={"m": [FAKE_PEERS[1]], "v": [1, 0]}),
        "ctl.app.serve": _ctl("app", body=serve),
        "ctl.app.profile": _ctl("app", body=profile_req),
        "app.serve": serve,
        "app.profile": profile_req,
        # Activation frames (frames.encode_frame). Without "cap" a frame for an unknown request
        # opens nothing; "act.fwd.open" does open one (a test should end it with "act.end").
        "act.fwd": fwd,
        "act.fwd.open": {
            **fwd,
            "r": "hostile-request-1",
            "cap": 8,
            "sm": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None},
        },
        "act.fwd.replay": {
            **fwd,
            "r": "hostile-request-2",
            "p": 2,
            "f": [1, 2],
            "fd": True,
            "g": 2,
        },
        "act.fwd.kv": {
            **fwd,
            "r": "hostile-request-3",
            "p": 3,
            "cap": 8,
            "kv": {
                "e": max(ctx.epoch - 1, 0),
                "st": [[p, a, b] for p, a, b in plan_obj(ctx)["stages"]],
                "n": 2,
                "d": 0,
            },
        },
        "act.tok": {"k": "tok", "r": "hostile-request-0", "e": ctx.epoch, "s": 1, "tok": 5},
        "act.end": {"k": "end", "r": "hostile-request-1", "e": ctx.epoch, "s": 0, "c": coord},
        "act.err": {
            "k": "err",
            "r": "hostile-request-0",
            "e": ctx.epoch,
            "s": 0,
            "err": "stage 1: boom",
            "rt": True,
            "bz": False,
        },
        # files.FileServer: a probe graph (cheap to serve) of a model nobody has.
        "files": {
            "sha": "cd" * 32,
            "what": "probe",
            "start": 0,
            "stop": 1,
            "file": "segment.json",
            "offset": 0,
        },
        "files.meta": {"sha": ctx.model_sha, "what": "meta", "file": "manifest.json", "offset": 0},
        # kvmove.serve: one request's caches of some layers of an old plan.
        "kv": {"e": max(ctx.epoch - 1, 0), "l": [0, 1], "r": "hostile-request-0", "n": 1},
        "probe.echo": {"echo": b"\0" * 64},
        "probe.sink": {"sink": b"\0" * 1024},
        "dataplane": {"protocol": "act"},
        "auth.hello": {"v": 1, "nonce": b"n" * 32},
        "auth.answer": {"mac": b"m" * 32},
        # What a peer answers when *it* is asked (the victim as the client): a file header
        # (files.fetch_file), a KV layer (kvmove._pull), a data-plane offer (p2p._open_fast),
        # the challenge's reply and verdict (admission.Admission.challenge), probe replies.
        "files.header": {"ok": True, "size": 26, "sha256": "ab" * 32},
        "files.refusal": {"ok": False, "error": "no such file"},
        "kv.layer": {"r": "hostile-request-0", "n": 1, "l": 0, "k": b"\0" * 64, "v": b"\0" * 64},
        "kv.done": {"done": True},
        "dataplane.offer": {"port": 9, "ticket": b"t" * 32, "key": b"k" * 32},
        "auth.reply": {"nonce": b"n" * 32, "mac": b"m" * 32},
        "auth.verdict": {"ok": True},
        "probe.echo-reply": {"echo": b"\0" * 64},
        "probe.got": {"got": 1024},
        "plan": plan_obj(ctx),
        "profile": profile_obj(ctx),
    }
    return out


# -- mutations -------------------------------------------------------------------------------

Where = tuple[Any, ...]


@dataclass(frozen=True)
class Case:
    """One generated message: what was done (for failure messages) and its bytes."""

    kind: str
    data: bytes
    protocol: str = ""

    def short(self, n: int = 48) -> str:
        """The kind, the size and the first *n* bytes in hex: enough to rebuild the case."""
        more = "…" if len(self.data) > n else ""
        return f"{self.protocol}:{self.kind} ({len(self.data)} B) {self.data[:n].hex()}{more}"


def paths(obj: Any, prefix: Where = ()) -> list[Where]:
    """Every position in *obj* (dict keys, list indices), parents before children."""
    out: list[Where] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out.extend(paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((*prefix, i))
            out.extend(paths(v, (*prefix, i)))
    return out


def _dotted(path: Where) -> str:
    return ".".join(str(p) for p in path) or "<message>"


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


def _get(obj: Any, path: Where) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _is_fixed(path: Where, fixed: Collection[str]) -> bool:
    dotted = _dotted(path)
    return any(dotted == f or dotted.startswith(f + ".") for f in fixed)


_UNKNOWN_KEYS: tuple[tuple[str, bytes], ...] = (
    ("text", tstr("zz-unknown")),
    ("empty", tstr("")),
    ("nul", tstr("\x00")),
    ("int", uint(7)),
    ("negative", nint(-1)),
    ("bignum", bignum(_BIG)),
    ("bytes", bstr(b"k")),
    ("float-nan", double(math.nan)),
    ("null", b"\xf6"),
    ("list", array(uint(1))),
    ("tagged", tag(1234, tstr("k"))),
)


def mutate(rng: Chooser, template: dict[str, Any], fixed: Collection[str] = ()) -> Case:
    """One hostile message made from *template*; ``fixed`` names dotted paths (``"r"``,
    ``"x.plan"``) left alone. Most mutations keep the message well-formed CBOR, with one
    field hostile, so they reach a decoder's validation rather than stop in the parser."""
    spots = [p for p in paths(template) if not _is_fixed(p, fixed)]
    op = rng.randrange(100)
    if op < 55 and spots:  # replace one field, nested ones included
        where = _choice(rng, spots)
        name, item = hostile_item(rng)
        original = _get(template, where)
        if isinstance(original, bytes) and original and rng.randrange(3) == 0:
            # The right size, hostile content: token ids out of range, NaN activations.
            name, junk = _choice(
                rng,
                (
                    ("bytes:same-size-ff", lambda n: b"\xff" * n),
                    ("bytes:same-size-f32-nan", lambda n: (b"\x00\x00\xc0\x7f" * n)[:n]),
                    ("bytes:same-size-f32-inf", lambda n: (b"\x00\x00\x80\x7f" * n)[:n]),
                    ("bytes:same-size-random", rng.randbytes),
                ),
            )
            item = bstr(junk(len(original)))
        elif rng.randrange(8) == 0:  # sometimes wrap the original value in a tag instead
            number = _choice(rng, (55799, 1234, 28, 258))
            name, item = f"tag:{number}-around", tag(number, encode(_get(template, where)))
        msg = _copy(template)
        parent = _get(msg, where[:-1])
        parent[where[-1]] = Raw(item)
        return Case(f"set {_dotted(where)}={name}", encode(msg))
    if op < 65:  # drop a field
        keyed = [p for p in spots if isinstance(_get(template, p[:-1]), dict)]
        if keyed:
            where = _choice(rng, keyed)
            msg = _copy(template)
            del _get(msg, where[:-1])[where[-1]]
            return Case(f"drop {_dotted(where)}", encode(msg))
    if op < 73:  # add unknown fields to some map
        maps = [p[:-1] for p in spots if isinstance(_get(template, p[:-1]), dict)] or [()]
        where = _choice(rng, maps)
        msg = _copy(template)
        target = _get(msg, where)
        names = []
        for _ in range(rng.randrange(1, 4)):
            kname, key = _choice(rng, _UNKNOWN_KEYS)
            vname, value = hostile_item(rng, depth=1)
            target[Raw(key)] = Raw(value)
            names.append(f"{kname}:{vname}")
        return Case(f"add {_dotted(where)}+{{{','.join(names)}}}", encode(msg))
    if op < 78:  # the same key twice: the later, hostile, one wins in cbor2
        keyed = [p for p in spots if isinstance(_get(template, p[:-1]), dict)]
        if keyed:
            where = _choice(rng, keyed)
            parent = _get(template, where[:-1])
            name, item = hostile_item(rng)
            pairs = [(encode(k), encode(v)) for k, v in parent.items()]
            pairs.append((encode(where[-1]), item))
            msg = _copy(template)
            holder = _get(msg, where[:-2]) if len(where) > 1 else None
            raw = Raw(cmap(*pairs))
            if holder is None:
                return Case(f"duplicate {_dotted(where)}={name}", raw.data)
            holder[where[-2]] = raw
            return Case(f"duplicate {_dotted(where)}={name}", encode(msg))
    if op < 83:  # the whole message replaced, or wrapped
        name, item = hostile_item(rng)
        if rng.randrange(2):
            return Case(f"whole={name}", item)
        number = _choice(rng, (55799, 1234, 258, 28, 24))
        body = encode(template)
        return Case(f"whole=tag:{number}-around", tag(number, bstr(body) if number == 24 else body))
    if op < 88:  # truncated
        data = encode(template)
        cut = rng.randrange(len(data))
        return Case(f"truncated@{cut}/{len(data)}", data[:cut])
    if op < 92:  # trailing garbage after a valid message
        data = encode(template)
        return Case("trailing-garbage", data + rng.randbytes(rng.randrange(1, 16)))
    if op < 96:  # bytes flipped
        data = bytearray(encode(template))
        flips = rng.randrange(1, 4)
        for _ in range(flips):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return Case(f"flipped-bits:{flips}", bytes(data))
    # Indefinite-length re-encoding of the top-level map: a legitimate, unusual spelling.
    items = b"".join(encode(k) + encode(v) for k, v in template.items())
    return Case("indefinite-map", indefinite(MAP) + items + BREAK)


def sweep(
    rng: Chooser, template: dict[str, Any], fixed: Collection[str] = (), per_spot: int = 2
) -> Iterator[Case]:
    """Every field of *template* in turn (nested ones included, *fixed* ones left alone):
    dropped where a map holds it, then set to *per_spot* hostile items, the well-formed kinds
    taken in rotation so that each kind meets many fields. Random mutation alone hits a given
    field with a given kind rarely; a sweep makes sure none is missed."""
    spots = [p for p in paths(template) if not _is_fixed(p, fixed)]
    kinds = WELL_FORMED_KINDS
    turn = 0
    for where in spots:
        if isinstance(_get(template, where[:-1]), dict):
            msg = _copy(template)
            del _get(msg, where[:-1])[where[-1]]
            yield Case(f"drop {_dotted(where)}", encode(msg))
        for _ in range(per_spot):
            name, item = hostile_item(rng, kinds[turn % len(kinds)])
            turn += 1
            msg = _copy(template)
            _get(msg, where[:-1])[where[-1]] = Raw(item)
            yield Case(f"set {_dotted(where)}={name}", encode(msg))


def hostile_cases(
    rng: Chooser,
    template: dict[str, Any],
    n: int,
    *,
    protocol: str = "",
    fixed: Collection[str] = (),
) -> Iterator[Case]:
    """*n* hostile messages made from *template*: a :func:`sweep` of its fields first (as
    much of it as *n* allows), then random :func:`mutate` cases."""
    made = 0
    for case in sweep(rng, template, fixed):
        if made == n:
            return
        made += 1
        yield replace(case, protocol=protocol)
    for _ in range(n - made):
        yield replace(mutate(rng, template, fixed), protocol=protocol)


def hostile_payloads(
    rng: random.Random, protocol: str, n: int, ctx: Context | None = None
) -> Iterator[bytes]:
    """*n* hostile payloads (unframed CBOR bytes) for *protocol*, a key of :func:`templates`."""
    template = templates(ctx)[protocol]
    for case in hostile_cases(rng, template, n, protocol=protocol):
        yield case.data


# -- framing ---------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """meshllm.mesh.framing.frame: a 4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


def frame_attacks(rng: Chooser, payload: bytes, max_frame: int = 1 << 20) -> tuple[str, bytes]:
    """Bytes to write on a framed stream, abusing the framing around *payload*; the stream
    is then closed or reset by the caller. ``(name, bytes)``."""
    i = rng.randrange(8)
    if i == 0:
        return "frame:over-limit", struct.pack(">I", max_frame + 1) + payload
    if i == 1:
        return "frame:claims-4GiB", b"\xff\xff\xff\xff" + payload
    if i == 2:  # cut inside the payload
        data = frame(payload)
        return "frame:cut-in-payload", data[: rng.randrange(4, max(5, len(data)))]
    if i == 3:
        return "frame:cut-in-header", frame(payload)[: rng.randrange(1, 4)]
    if i == 4:
        return "frame:empty-payload", frame(b"")
    if i == 5:
        return "frame:many-empty", frame(b"") * 200
    if i == 6:
        return "frame:claims-more", struct.pack(">I", len(payload) + 1000) + payload
    return "frame:random", rng.randbytes(rng.randrange(1, 32))


# -- hypothesis ------------------------------------------------------------------------------


class _Draws:
    """A :class:`Chooser` backed by hypothesis draws, so failing examples shrink."""

    def __init__(self, draw: Callable[[Any], Any]):
        from hypothesis import strategies as st

        self._draw = draw
        self._st = st

    def randrange(self, start: int, stop: int | None = None) -> int:
        if stop is None:
            start, stop = 0, start
        return self._draw(self._st.integers(start, stop - 1))

    def random(self) -> float:
        return self._draw(self._st.floats(0.0, 1.0, exclude_max=True))

    def randbytes(self, n: int) -> bytes:
        return self._draw(self._st.binary(min_size=n, max_size=n))


def hostile_cbor(template: dict[str, Any], fixed: Collection[str] = ()) -> Any:
    """A hypothesis strategy of hostile messages (bytes) made from *template*."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> bytes:
        return mutate(_Draws(draw), template, fixed).data

    return build()


def hostile_cases_st(template: dict[str, Any], fixed: Collection[str] = ()) -> Any:
    """As :func:`hostile_cbor`, giving :class:`Case` (kind and bytes)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> Case:
        return mutate(_Draws(draw), template, fixed)

    return build()


def hostile_items(kind: str | None = None) -> Any:
    """A hypothesis strategy of single hostile items ``(name, bytes)``."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> tuple[str, bytes]:
        return hostile_item(_Draws(draw), kind)

    return build()
