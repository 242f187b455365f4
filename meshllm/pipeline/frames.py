"""Activation frames: what travels between pipeline stages and back to the coordinator.

One CBOR map per frame, length-prefixed on the wire. Tensors are ``[dtype, shape, raw bytes]``
(C order, little-endian). Decoding validates everything, so a malformed frame is an error with
a reason, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np

from meshllm.errors import MeshError

FWD, TOKEN, END, ERROR = "fwd", "tok", "end", "err"
KINDS = (FWD, TOKEN, END, ERROR)
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
MAX_DIMS = 4
MAX_TENSORS = 16


class BadFrame(MeshError):
    """A frame that does not decode to a valid activation message."""


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


def encode_tensor(a: np.ndarray) -> list[Any]:
    a = np.ascontiguousarray(a)
    return [a.dtype.name, list(a.shape), a.tobytes()]


def decode_tensor(name: str, raw: Any) -> np.ndarray:
    if not isinstance(raw, list) or len(raw) != 3:
        raise BadFrame(f"tensor {name!r} is not [dtype, shape, data]")
    dtype_name, shape, data = raw
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise BadFrame(f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise BadFrame(f"tensor {name!r} has a bad shape {shape!r}")
    if not isinstance(data, bytes):
        raise BadFrame(f"tensor {name!r} has no byte data")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise BadFrame(f"tensor {name!r}: {len(data)} bytes for shape {shape} of {dtype_name}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_frame(f: Frame) -> bytes:
    obj: dict[str, Any] = {"k": f.kind, "r": f.rid, "e": f.epoch, "s": f.step}
    if f.kind == FWD:
        obj.update(p=f.pos, n=f.new, c=f.coord,
                   t={k: encode_tensor(v) for k, v in f.tensors.items()})  # fmt: skip
        if f.cap:
            obj["cap"] = f.cap
        if f.sampling:
            obj["sm"] = f.sampling
    elif f.kind == TOKEN:
        obj["tok"] = f.token
    elif f.kind == ERROR:
        obj["err"] = f.error
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
    try:
        obj = cbor2.loads(data)
    except Exception:
        raise BadFrame("not CBOR") from None
    if not isinstance(obj, dict):
        raise BadFrame("frame is not a map")
    kind = obj.get("k")
    if kind not in KINDS:
        raise BadFrame(f"unknown frame kind {kind!r}")
    rid = obj.get("r")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise BadFrame("bad request id")
    f = Frame(kind=kind, rid=rid, epoch=_int(obj, "e"), step=_int(obj, "s"))
    cs = obj.get("cs", [])
    if not isinstance(cs, list) or len(cs) > 64 or not all(isinstance(x, float | int) for x in cs):
        raise BadFrame("bad stage timings")
    f.compute_s = [float(x) for x in cs]
    at = obj.get("at", 0.0)
    if not isinstance(at, float | int):
        raise BadFrame("bad timestamp")
    f.sent_at = float(at)
    if kind == FWD:
        f.pos, f.new = _int(obj, "p", lo=1), _int(obj, "n", lo=1)
        if f.new > f.pos:
            raise BadFrame("more new tokens than positions")
        f.cap = _int(obj, "cap", 0)
        coord = obj.get("c")
        if not isinstance(coord, str) or not coord:
            raise BadFrame("missing coordinator")
        f.coord = coord
        sm = obj.get("sm", {})
        if not isinstance(sm, dict):
            raise BadFrame("bad sampling parameters")
        f.sampling = sm
        tensors = obj.get("t")
        if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
            raise BadFrame("bad tensor map")
        f.tensors = {str(k): decode_tensor(str(k), v) for k, v in tensors.items()}
    elif kind == TOKEN:
        f.token = _int(obj, "tok")
    elif kind == ERROR:
        err = obj.get("err")
        if not isinstance(err, str):
            raise BadFrame("bad error text")
        f.error = err[:2000]
    elif kind == END:
        coord = obj.get("c", "")
        f.coord = coord if isinstance(coord, str) else ""
    return f
