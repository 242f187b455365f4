"""Activation frames: what travels between pipeline stages and back to the coordinator.

One CBOR map per frame, length-prefixed on the wire. Tensors are ``[dtype, shape, raw bytes]``
(C order, little-endian). Decoding validates everything, so a malformed frame is an error with
a reason, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np

from meshllm import wire
from meshllm.model.sampling import SamplingParams

FWD, TOKEN, END, ERROR = "fwd", "tok", "end", "err"
KINDS = (FWD, TOKEN, END, ERROR)
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
MAX_DIMS = 4
MAX_TENSORS = 16
MAX_FORCED = 1 << 16
MAX_ITEMS = MAX_FORCED + 1024  # a replay's forced tokens and the rest of a frame


class BadFrame(wire.BadMessage):
    """A frame that does not decode to a valid activation message."""


_show = wire.show


@dataclass(frozen=True)
class KVSource:
    """Where a request's KV cache is, on its first frame on a new plan."""

    epoch: int  # the old plan
    stages: tuple[tuple[str, int, int], ...]  # its (peer, start, stop) stages
    length: int  # positions every old stage has computed (the cache to move)
    drawn: int  # tokens sampled so far (a seeded sampler skips that many draws)

    def to_obj(self) -> dict[str, Any]:
        return {
            "e": self.epoch,
            "st": [list(s) for s in self.stages],
            "n": self.length,
            "d": self.drawn,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> KVSource:
        """Raises ValueError on anything malformed (frames come from the network)."""
        if not isinstance(obj, dict):
            raise ValueError("not a map")
        stages = obj.get("st")
        if not isinstance(stages, list) or not 0 < len(stages) <= 256:
            raise ValueError("bad stages")
        parsed = []
        for s in stages:
            if not (
                isinstance(s, list)
                and len(s) == 3
                and wire.peer_id(s[0], "stage peer")
                and all(is_int(x) and 0 <= x < 1 << 20 for x in s[1:])
                and s[1] < s[2]
            ):
                raise ValueError("bad stage")
            parsed.append((s[0], s[1], s[2]))
        e, n, d = obj.get("e"), obj.get("n"), obj.get("d")
        if not (is_int(e) and is_int(n) and is_int(d)):
            raise ValueError("bad numbers")
        if not (0 <= e < 1 << 62 and 0 < n < 1 << 31 and 0 <= d < 1 << 31):
            raise ValueError("numbers out of range")
        return cls(e, tuple(parsed), n, d)


def _seconds(value: Any, what: str) -> float:
    return wire.number(value, what, 0.0)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Frame:
    kind: str
    rid: str
    epoch: int
    step: int = 0
    pos: int = 0  # positions in the sequence after this step's tokens
    new: int = 0  # tokens added in this step
    cap: int = 0  # KV capacity, on the first frame of a request
    coord: str = ""  # peer id of the request's coordinator
    sampling: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    token: int = -1
    error: str = ""
    compute_s: list[float] = field(default_factory=list)  # per stage, in order
    sent_at: float = 0.0
    # Replay after a plan change: tokens the last stage feeds back instead of its samples,
    # so the new stages rebuild exactly the KV caches the old ones had (see Coordinator).
    force: list[int] = field(default_factory=list)
    retry: bool = False  # an ERROR the request may survive: a peer or a plan went away
    busy: bool = False  # an ERROR meaning "full now, try again shortly" (nothing was started)
    # A forced step whose next input stage 0 has already fed itself: the last stage emits
    # force[0] and does not loop it back (replays then pipeline through the stages).
    fed: bool = False
    # On a request's first frame on a new plan: where to fetch its KV cache from (no replay).
    kv_from: KVSource | None = None
    # Frames sent on together from one batched step: the next stage runs a frame with a group
    # as a batch with the rest of its group rather than alone as it arrives.
    group: int = 0


def encode_tensor(a: np.ndarray) -> list[Any]:
    # tobytes() is C order whatever the layout; np.ascontiguousarray would turn a 0-d array
    # into shape (1,), so scalars did not round-trip.
    return [a.dtype.name, list(a.shape), a.tobytes()]


def decode_tensor(name: str, raw: Any) -> np.ndarray:
    if not isinstance(raw, list) or len(raw) != 3:
        raise BadFrame(f"tensor {name!r} is not [dtype, shape, data]")
    dtype_name, shape, data = raw
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise BadFrame(f"tensor {name!r} has unsupported dtype {_show(dtype_name)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise BadFrame(f"tensor {name!r} has a bad shape {_show(shape)}")
    if not isinstance(data, bytes):
        raise BadFrame(f"tensor {name!r} has no byte data")
    # Python ints: in int64 the product of four dimensions under 2**31 can wrap (2**90 -> 0),
    # and a wrapped size that matched the data left reshape() to raise ValueError.
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise BadFrame(f"tensor {name!r}: {len(data)} bytes for shape {shape} of {dtype_name}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_frame(f: Frame) -> bytes:
    obj: dict[str, Any] = {"k": f.kind, "r": f.rid, "e": f.epoch, "s": f.step}
    if f.kind == FWD:
        obj.update(
            p=f.pos, n=f.new, c=f.coord, t={k: encode_tensor(v) for k, v in f.tensors.items()}
        )
        if f.cap:
            obj["cap"] = f.cap
        if f.sampling:
            obj["sm"] = f.sampling
        if f.force:
            obj["f"] = f.force
        if f.fed:
            obj["fd"] = True
        if f.kv_from is not None:
            obj["kv"] = f.kv_from.to_obj()
        if f.group > 1:
            obj["g"] = f.group
    elif f.kind == TOKEN:
        obj["tok"] = f.token
    elif f.kind == ERROR:
        obj["err"] = f.error
        if f.retry:
            obj["rt"] = True
        if f.busy:
            obj["bz"] = True
    elif f.kind == END:
        obj["c"] = f.coord
    if f.compute_s:
        obj["cs"] = f.compute_s
    if f.sent_at:
        obj["at"] = f.sent_at
    return cbor2.dumps(obj)


def _int(obj: dict[str, Any], key: str, default: int | None = None, lo: int = 0) -> int:
    v = obj.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < 2**62:
        raise BadFrame(f"field {key!r} must be an integer >= {lo}")
    return v


def decode_frame(data: bytes) -> Frame:
    """The frame *data* encodes (raises :class:`BadFrame` with the reason)."""
    try:
        return _decode_frame(data)
    except BadFrame:
        raise
    except wire.BadMessage as exc:
        raise BadFrame(str(exc)) from None


def _decode_frame(data: bytes) -> Frame:
    obj = wire.loads(data, max_items=MAX_ITEMS)
    if not isinstance(obj, dict):
        raise BadFrame("frame is not a map")
    kind = obj.get("k")
    if kind not in KINDS:
        raise BadFrame(f"unknown frame kind {_show(kind)}")
    rid = obj.get("r")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise BadFrame("bad request id")
    f = Frame(kind=kind, rid=rid, epoch=_int(obj, "e"), step=_int(obj, "s"))
    f.compute_s = wire.seq_of(obj.get("cs", []), "stage timings", 64, _seconds)
    f.sent_at = wire.number(obj.get("at", 0.0), "timestamp", 0.0)
    if kind == FWD:
        f.pos, f.new = _int(obj, "p", lo=1), _int(obj, "n", lo=1)
        if f.new > f.pos:
            raise BadFrame("more new tokens than positions")
        f.cap = _int(obj, "cap", 0)
        f.coord = wire.peer_id(obj.get("c"), "coordinator")
        # Checked here, on arrival, rather than when the last stage first samples.
        sm = obj.get("sm")
        f.sampling = {} if sm is None else SamplingParams.from_wire(sm).to_wire()
        tensors = obj.get("t")
        # Names must be strings (as encoded): str() of a bignum name would raise ValueError.
        if (
            not isinstance(tensors, dict)
            or len(tensors) > MAX_TENSORS
            or not all(isinstance(k, str) for k in tensors)
        ):
            raise BadFrame("bad tensor map")
        f.tensors = {k: decode_tensor(k, v) for k, v in tensors.items()}
        force = obj.get("f", [])
        if (
            not isinstance(force, list)
            or len(force) > MAX_FORCED
            or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in force
            )
        ):
            raise BadFrame("bad forced tokens")
        f.force = force
        f.fed = obj.get("fd") is True
        f.group = _int(obj, "g", 0)
        if f.fed and not force:
            raise BadFrame("a fed step without its forced token")
        if "kv" in obj:
            try:
                f.kv_from = KVSource.from_obj(obj["kv"])
            except ValueError as exc:
                raise BadFrame(f"bad KV source: {exc}") from None
            if not f.cap or force or f.kv_from.length >= f.pos:
                raise BadFrame("a KV source belongs on a request's first decode step")
    elif kind == TOKEN:
        f.token = _int(obj, "tok")
    elif kind == ERROR:
        err = obj.get("err")
        if not isinstance(err, str):
            raise BadFrame("bad error text")
        f.error = err[:2000]
        f.retry = obj.get("rt") is True
        f.busy = obj.get("bz") is True
    elif kind == END:
        coord = obj.get("c", "")
        f.coord = coord if isinstance(coord, str) and len(coord) <= 128 else ""
    return f


def bounce(data: bytes, reason: str) -> tuple[str, Frame] | None:
    """For a forward frame that does not decode: its coordinator and an ERROR frame telling
    it why, when the frame's request id, epoch, step and coordinator can still be read (so a
    request fails at once with the reason instead of waiting out its step timeout)."""
    try:
        obj = wire.mapping(wire.loads(data, max_items=MAX_ITEMS), "frame")
        if obj.get("k") != FWD:
            return None
        err = Frame(
            kind=ERROR,
            rid=wire.text(obj.get("r"), "rid", 64, empty=False),
            epoch=wire.integer(obj.get("e"), "epoch"),
            step=wire.integer(obj.get("s"), "step"),
            error=f"bad frame: {reason}"[:2000],
        )
        return wire.peer_id(obj.get("c"), "coordinator"), err
    except wire.BadMessage:
        return None
