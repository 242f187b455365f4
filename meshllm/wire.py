"""The one door for bytes from another process: strict CBOR, then typed, checked values.

Everything a peer sends (control messages and heartbeats, plans, profiles, file and KV
requests, activation frames, data-plane negotiation) enters through :func:`loads` and is then
turned into a typed value by the protocol's own decoder, built from the checks below. A value
that fails any check is a :class:`BadMessage` with the reason; nothing else may escape.

**CBOR, before it is decoded.** :func:`scan` walks the encoding's headers without building
anything and refuses what no meshllm protocol sends: every tag (bignums, decimal fractions and
bigfloats among them: ``int()`` of the decimal ``1E+600000`` holds the GIL for seconds),
indefinite lengths, ``undefined`` and other simple values, map keys that are not text, lengths
past the end of the data, nesting deeper than :data:`MAX_DEPTH`, and trailing bytes. What is
left decodes to ``int`` (64 bits at most), ``float``, ``str``, ``bytes``, ``list``, ``dict``
(with text keys), ``bool`` and ``None`` only.

**Values.** Integers are ``int`` and never ``bool``, within the range the field allows; floats
are finite; strings are bounded, and of a fixed alphabet where one exists (model hashes are 64
lower-case hex digits, peer ids base58, names a safe subset of ASCII); lists and maps are
bounded.

**Unknown fields** of a map are ignored: a peer of a newer version may add fields, and an
older peer must still understand the ones it knows. Known fields are checked strictly, and a
message without a required field is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import cbor2

from meshllm.errors import MeshError

MAX_DEPTH = 32
# Items in one message: the scan and the decoder cost a fraction of a microsecond each, on the
# event loop, so a message of millions of one-byte items would hold it for seconds.
MAX_ITEMS = 1 << 15
INT_MAX = 2**62  # exclusive upper bound of counters, epochs, sizes and terms on the wire

T = TypeVar("T")


class BadMessage(MeshError):
    """A message from another process that does not decode to a valid value."""


# -- CBOR ---------------------------------------------------------------------------------------
_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
_FALSE, _TRUE, _NULL = 20, 21, 22


def scan(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Check that *data* is exactly one CBOR item of the kinds meshllm sends (see the module
    docstring), without decoding it; raises :class:`BadMessage`."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    # Per open nesting level: items still to read, and whether it is a map (whose items at
    # even counts left, counting down, are its keys).
    pending = [[1, False]]
    while pending:
        level = pending[-1]
        if level[0] == 0:
            pending.pop()
            continue
        is_key = level[1] and level[0] % 2 == 0
        level[0] -= 1
        if pos >= end:
            raise BadMessage("CBOR ends inside an item")
        initial = view[pos]
        pos += 1
        major, info = initial >> 5, initial & 31
        if is_key and major != 3:
            raise BadMessage("CBOR map keys must be text strings")
        if info < 24:
            arg = info
        elif info in _ARG_BYTES:
            n = _ARG_BYTES[info]
            if pos + n > end:
                raise BadMessage("CBOR ends inside an item's header")
            arg = int.from_bytes(view[pos : pos + n], "big")
            pos += n
        elif info == 31:
            raise BadMessage("indefinite-length CBOR items are not accepted")
        else:
            raise BadMessage("malformed CBOR header")
        if major in (0, 1):
            continue
        if major in (2, 3):
            if arg > end - pos:
                raise BadMessage("a CBOR string is longer than the message")
            pos += arg
        elif major in (4, 5):
            count = arg * (2 if major == 5 else 1)
            if count > end - pos:  # every item takes at least one byte
                raise BadMessage("a CBOR container claims more items than the message holds")
            max_items -= count
            if max_items < 0:
                raise BadMessage("a CBOR message with more items than its protocol allows")
            if len(pending) > max_depth:
                raise BadMessage(f"CBOR nested deeper than {max_depth}")
            pending.append([count, major == 5])
        elif major == 6:
            raise BadMessage(f"CBOR tag {arg} is not accepted")
        elif info in (_FALSE, _TRUE, _NULL) or info in (25, 26, 27):
            continue  # false, true, null, or a float (finiteness is the field's check)
        else:
            raise BadMessage("CBOR simple values other than false, true and null are refused")
    if pos != end:
        raise BadMessage("bytes after the CBOR item")


def loads(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Any:
    """*data* decoded after :func:`scan` accepted it; raises :class:`BadMessage`."""
    scan(data, max_depth=max_depth, max_items=max_items)
    try:
        return cbor2.loads(data)
    except Exception as exc:  # invalid UTF-8 in a text string, and the like
        raise BadMessage(f"bad CBOR: {type(exc).__name__}") from None


def dumps(obj: Any) -> bytes:
    return cbor2.dumps(obj)


# -- values -------------------------------------------------------------------------------------
_HEX64 = re.compile(r"[0-9a-f]{64}")
# libp2p ids are base58; other transports (the in-memory one) use letters, digits and "-".
_PEER_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Model, partitioner and policy names: what `model import` and plugin registries produce.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")


def show(value: Any, limit: int = 40) -> str:
    """A short description of *value* for an error message: never its full text, and never
    ``repr`` of a huge int (which raises)."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool | float | type(None)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**20 else "a huge integer"
    return f"a {type(value).__name__}"


def integer(value: Any, what: str, lo: int = 0, hi: int = INT_MAX) -> int:
    """An ``int`` (not ``bool``) in ``[lo, hi)``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessage(f"{what} must be an integer, not {show(value)}")
    if not lo <= value < hi:
        raise BadMessage(f"{what} must be in [{lo}, {hi}), not {show(value)}")
    return value


def number(value: Any, what: str, lo: float = -1e18, hi: float = 1e18) -> float:
    """A finite number in ``[lo, hi]`` as a float (an int is accepted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadMessage(f"{what} must be a number, not {show(value)}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise BadMessage(f"{what} is out of range")
    x = float(value)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise BadMessage(f"{what} must be a finite number in [{lo:g}, {hi:g}], not {show(value)}")
    return x


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadMessage(f"{what} must be true or false, not {show(value)}")
    return value


def text(value: Any, what: str, max_len: int = 256, *, empty: bool = True) -> str:
    """A string of at most *max_len* characters without NUL."""
    if not isinstance(value, str):
        raise BadMessage(f"{what} must be a string, not {show(value)}")
    if len(value) > max_len:
        raise BadMessage(f"{what} is longer than {max_len} characters")
    if not value and not empty:
        raise BadMessage(f"{what} must not be empty")
    if "\0" in value:
        raise BadMessage(f"{what} contains a NUL character")
    return value


def _matching(pattern: re.Pattern[str], kind: str) -> Callable[[Any, str], str]:
    def check(value: Any, what: str) -> str:
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise BadMessage(f"{what} must be {kind}, not {show(value)}")
        return value

    return check


sha256_hex = _matching(_HEX64, "64 lower-case hex digits")
peer_id = _matching(_PEER_ID, "a peer id (letters, digits, - and _)")
name = _matching(_NAME, "a name of letters, digits and ._+- (at most 128)")


def choice(value: Any, what: str, choices: Collection[str]) -> str:
    """One of the strings *choices* (any other value, of any type, is refused)."""
    if not isinstance(value, str) or value not in choices:
        raise BadMessage(f"{what} must be one of {sorted(choices)}, not {show(value)}")
    return value


def is_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def is_sha256_hex(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def seq(value: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise BadMessage(f"{what} must be a list, not {show(value)}")
    if len(value) > max_len:
        raise BadMessage(f"{what} has more than {max_len} items")
    return value


def seq_of(value: Any, what: str, max_len: int, item: Callable[[Any, str], T]) -> list[T]:
    return [item(v, f"{what}[{i}]") for i, v in enumerate(seq(value, what, max_len))]


def mapping(value: Any, what: str, max_len: int = 64) -> dict[str, Any]:
    """A map with string keys only (of at most 64 characters)."""
    if not isinstance(value, dict):
        raise BadMessage(f"{what} must be a map, not {show(value)}")
    if len(value) > max_len:
        raise BadMessage(f"{what} has more than {max_len} entries")
    for k in value:
        if not isinstance(k, str) or len(k) > 64:
            raise BadMessage(f"{what} has a key that is not a short string: {show(k)}")
    return value


def optional(value: Any, what: str, check: Callable[[Any, str], T]) -> T | None:
    return None if value is None else check(value, what)
