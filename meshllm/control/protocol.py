"""Control protocol: one JSON object per line each way, versioned, with error objects.

Request:  {"v": 1, "id": <any>, "op": "status", "args": {...}}
Response: {"v": 1, "id": <same>, "ok": true, "result": ...}
      or  {"v": 1, "id": <same>, "ok": false, "error": {"code": "...", "message": "..."}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_LINE = 1 << 20
SOCKET_NAME = "control.sock"


@dataclass(frozen=True)
class ControlError(Exception):
    code: str
    message: str

    def to_obj(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Request:
    id: Any
    op: str
    args: dict[str, Any]


def _int(text: str) -> int:
    value = int(text) if len(text) <= 20 else None
    if value is None or not -(2**63) <= value < 2**63:
        raise ValueError(f"integer out of range: {text[:24]}...")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is read as infinity
        raise ValueError(f"number out of range: {text[:24]}")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a request may carry")


def loads(line: bytes) -> Any:
    """JSON as requests may carry it: integers within 64 bits, no NaN or Infinity (Python's
    json takes both, and a number of 4000 digits costs seconds to convert)."""
    return json.loads(line, parse_int=_int, parse_float=_float, parse_constant=_constant)


def parse_request(line: bytes) -> Request:
    """Decode one request line; raises ControlError with a precise code."""
    try:
        obj = loads(line)
    # ValueError covers the decode errors and also an integer of over 4300 digits;
    # RecursionError is nesting deeper than the interpreter's stack allows.
    except (ValueError, RecursionError) as exc:
        raise ControlError("bad_json", f"request is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlError("bad_request", "request must be a JSON object")
    if obj.get("v") != VERSION:
        raise ControlError(
            "unsupported_version", f"unsupported protocol version {obj.get('v')!r}; use {VERSION}"
        )
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise ControlError("bad_request", "missing 'op' (a string)")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("bad_request", "'args' must be an object")
    return Request(obj.get("id"), op, args)


def request_id(line: bytes) -> Any:
    """The id of a request, if it can be read at all (for error replies)."""
    try:
        obj = loads(line)
        return obj.get("id") if isinstance(obj, dict) else None
    except (ValueError, RecursionError):  # as in parse_request
        return None


def ok(req_id: Any, result: Any) -> bytes:
    return _line({"v": VERSION, "id": req_id, "ok": True, "result": result})


def error(req_id: Any, err: ControlError) -> bytes:
    return _line({"v": VERSION, "id": req_id, "ok": False, "error": err.to_obj()})


def event(req_id: Any, obj: dict[str, Any]) -> bytes:
    return _line({"v": VERSION, "id": req_id, "event": obj})


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
