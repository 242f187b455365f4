"""Containment: whatever a remote party sends costs at most its own connection or message.

Every handler of input from outside the process (a libp2p stream, a data-plane connection, a
control message, work started because of one) runs through :func:`contain` or is wrapped by
:func:`contained`. An exception there is logged with the peer and what was being served, the
connection it came on is closed by its owner's ``finally``, and it never reaches a nursery that
holds the daemon. Cancellation (a ``BaseException``) passes through untouched: it is how the
daemon shuts a handler down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
import trio

from meshllm.errors import MeshError

log = structlog.get_logger("meshllm.contain")

A = TypeVar("A")


def _reason(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a hostile value's own __str__ can fail too
        text = ""
    return f"{type(exc).__name__}: {text}"[:300]


def report(exc: Exception, what: str, peer: str | None) -> None:
    """Log a failure contained while serving *what* for *peer*: a ``MeshError`` is a refusal
    we meant (a warning); anything else is a bug of ours, logged with its traceback."""
    if isinstance(exc, MeshError):
        log.warning("handler_refused", what=what, other=peer, reason=_reason(exc))
    else:
        log.error("handler_failed", what=what, other=peer, reason=_reason(exc), exc_info=exc)


async def contain(
    what: str, peer: str | None, fn: Callable[..., Awaitable[Any]], *args: Any
) -> None:
    """Run ``await fn(*args)``; an exception it raises is reported, not propagated."""
    try:
        await fn(*args)
    except Exception as exc:
        report(exc, what, peer)


def contain_sync(what: str, peer: str | None, fn: Callable[..., Any], *args: Any) -> None:
    """:func:`contain` for a synchronous handler (a decoded message's callback)."""
    try:
        fn(*args)
    except Exception as exc:
        report(exc, what, peer)


def contained(
    what: str, handler: Callable[[A], Awaitable[Any]], peer_of: Callable[[A], str | None]
) -> Callable[[A], Awaitable[None]]:
    """*handler* (of one stream or connection) behind :func:`contain`."""

    async def run(arg: A) -> None:
        try:
            peer = peer_of(arg)
        except Exception:
            peer = None
        await contain(what, peer, handler, arg)

    return run


def spawn(
    nursery: trio.Nursery,
    what: str,
    peer: str | None,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
) -> None:
    """Start work a remote party asked for (a plan, a profile) in *nursery*, contained."""
    nursery.start_soon(contain, what, peer, fn, *args)


async def supervised(
    what: str, fn: Callable[..., Awaitable[Any]], *args: Any, restart_s: float = 1.0
) -> None:
    """Run a long-lived loop of this peer's (plan watch, balancer) that acts on what peers
    publish; one that raises is reported and started again, never left dead or let through."""
    while True:
        await contain(what, None, fn, *args)
        await trio.sleep(restart_s)
