"""Errors of the HTTP API, as OpenAI's clients expect them:
``{"error": {"message", "type", "param", "code"}}`` with a fitting status code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.errors import Refused

INVALID = "invalid_request_error"
SERVER = "server_error"


@dataclass(frozen=True)
class ApiError(Exception):
    status: int
    message: str
    type: str = INVALID
    code: str | None = None
    param: str | None = None
    # Extra response headers: Allow for a 405, Retry-After where trying again soon helps.
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# The serving path's refusals (the control socket sends their codes), as HTTP sees them.
_FROM_CODE: dict[str, tuple[int, str, int | None]] = {
    "bad_request": (400, INVALID, None),
    "too_large": (400, INVALID, None),
    "busy": (429, "rate_limit_error", 1),
    "not_ready": (503, SERVER, 2),
    "not_serving": (503, SERVER, None),
    "query_failed": (503, SERVER, None),
}


def from_refusal(err: Refused) -> ApiError:
    status, kind, retry = _FROM_CODE.get(err.code, (500, SERVER, None))
    headers = () if retry is None else (("retry-after", str(retry)),)
    return ApiError(status, str(err), kind, err.code, headers=headers)
