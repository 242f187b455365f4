"""Secrets are never printed: not by ``repr``/``str`` of what holds them, and not by a logged
traceback of a frame that holds them as locals (the console renderer used on a terminal
would show every frame's locals by default when rich is installed).

Each secret below is ASCII, so that even a shortened ``repr`` of its bytes would show it.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog

from meshllm import log
from meshllm.mesh.dataplane import _Expected
from meshllm.mesh.identity import JoinToken, MeshSecret
from meshllm.mesh.transport import EndpointOptions

SECRET = b"MESH-SECRET-0123456789abcdefghij"
SEED = b"KEY-SEED-0123456789abcdefghijklm"
DATA_KEY = b"DATA-KEY-0123456789abcdefghijklm"
assert len(SECRET) == len(SEED) == len(DATA_KEY) == 32


def forms(raw: bytes) -> list[str]:
    """The ways *raw* could show up in text: as in its repr (a prefix is enough), hex, base64."""
    return [
        repr(raw)[2:22],
        raw.hex()[:20],
        raw.hex().upper()[:20],
        base64.b64encode(raw).decode()[:20],
        base64.urlsafe_b64encode(raw).decode()[:20],
    ]


def secret_forms() -> list[str]:
    """The secret, the keys derived from it, the token made of it, the seed and a data key."""
    secret = MeshSecret(SECRET)
    token = JoinToken(secret, ("/ip4/127.0.0.1/tcp/7410",))
    body = token.encode().removeprefix("meshllm1-")
    return [
        *forms(SECRET),
        *forms(secret.pnet_key),
        *forms(secret.auth_key),
        *forms(SEED),
        *forms(DATA_KEY),
        body[:20],
        body[-20:],
    ]


def assert_no_secret(text: str) -> None:
    for form in secret_forms():
        assert form not in text, f"{form!r} printed in {text[:2000]}"


def holders() -> list[object]:
    secret = MeshSecret(SECRET)
    return [
        secret,
        JoinToken(secret, ("/ip4/127.0.0.1/tcp/7410",)),
        EndpointOptions(key_seed=SEED, secret=secret, listen=("/ip4/127.0.0.1/tcp/0",)),
        _Expected("peer-a", "act", DATA_KEY, 1.0),
    ]


@pytest.mark.parametrize("holder", holders(), ids=lambda h: type(h).__name__)
def test_repr_and_str_are_redacted(holder):
    for text in (repr(holder), str(holder), f"{holder}", repr([holder]), repr({"x": holder})):
        assert_no_secret(text)
    # What is safe to show still shows: the public fingerprint, the peer, the addresses.
    text = repr(holder)
    if not isinstance(holder, _Expected):
        assert MeshSecret(SECRET).mesh_id in text
    if isinstance(holder, JoinToken | EndpointOptions):
        assert "/ip4/127.0.0.1/tcp/" in text


def test_redaction_keeps_the_values_usable():
    secret = MeshSecret(SECRET)
    token = JoinToken.decode(JoinToken(secret, ("/ip4/1.2.3.4/tcp/1",)).encode())
    assert token.secret == secret and token.secret.raw == SECRET


def _fail_holding_secrets() -> None:
    secret = MeshSecret(SECRET)
    token = JoinToken(secret, ("/ip4/127.0.0.1/tcp/7410",))
    options = EndpointOptions(key_seed=SEED, secret=secret, listen=("/ip4/127.0.0.1/tcp/0",))
    encoded = token.encode()
    seed, pnet_key, data_key = SEED, secret.pnet_key, DATA_KEY
    expected = _Expected("peer-a", "act", data_key, 1.0)
    assert all((options, encoded, seed, pnet_key, expected))  # all live locals of this frame
    raise ValueError("a bug while holding secrets")


Render = Callable[[Callable[[], None]], str]


@pytest.fixture(params=["console", "json"])
def render(request, monkeypatch) -> Iterator[Render]:
    """``render(emit)``: what *emit* logs through the project's log set-up, as the daemon
    gets it on a terminal ("console") or not ("json"). The previous set-up is put back."""

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return request.param == "console"

    def render(emit: Callable[[], None]) -> str:
        out = Stderr()
        # Swapped here, not in the fixture: pytest swaps sys.stderr again for each phase.
        with monkeypatch.context() as patch:
            patch.setattr("sys.stderr", out)
            patch.setattr(log, "_configured", None)
            log.configure("info")
            emit()
        return out.getvalue()

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield render
    finally:
        structlog.configure(**saved)
        root.handlers[:], root.level = saved_handlers, saved_level


def _log_a_failure() -> None:
    logger = structlog.get_logger("meshllm.test")
    try:
        _fail_holding_secrets()
    except ValueError as exc:
        logger.exception("handler_failed", what="test")
        logger.error("handler_failed", what="test", exc_info=exc)  # as contain.report does
        logging.getLogger("thirdparty").exception("stdlib_failed")


def test_logged_tracebacks_show_no_secret(render):
    text = render(_log_a_failure)
    assert "handler_failed" in text and "stdlib_failed" in text
    assert_no_secret(text)


@pytest.mark.parametrize("render", ["console"], indirect=True)  # JSON lines: no traceback
def test_console_tracebacks_are_rendered_without_locals(render):
    text = render(_log_a_failure)
    # The traceback is there (the frame and the error), its locals are not: not even the
    # harmless ones (the source spells "peer-a" with double quotes, a local's repr would not).
    assert "_fail_holding_secrets" in text and "a bug while holding secrets" in text
    assert "'peer-a'" not in text and MeshSecret(SECRET).mesh_id not in text
