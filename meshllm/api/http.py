"""A small HTTP/1.1 server on trio and h11: requests with bounded bodies in, JSON or
server-sent events out, keep-alive, and an error object for whatever a client gets wrong.

It knows nothing of OpenAI: a handler gets each :class:`Request` with a :class:`Responder`
and either answers through it or raises :class:`ApiError`. A handler's bug becomes a 500 and
is logged; the server itself keeps serving whatever clients send.

It keeps to the rules that stop a web page from using it through a visitor's browser
(:class:`~meshllm.api.browser.BrowserRules`): a ``Host`` it does not listen as (DNS
rebinding) is refused, and so is an ``Origin`` it was not told to trust (cross-site
requests), and a POST that is not
``application/json`` (a form's or ``text/plain`` body, which browsers send cross-site without
asking first). A connection holds one of the MAX_CONNECTIONS slots only from a complete
request (head and body) to the end of its response: a silent, slow or idle client costs no
slot.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import structlog
import trio

from meshllm import __version__
from meshllm.api.browser import BrowserRules, url_host
from meshllm.api.errors import SERVER, ApiError
from meshllm.errors import MeshError

MAX_BODY = 1 << 20  # as large as a control-socket request line
MAX_HEADERS = 16 << 10
MAX_CONNECTIONS = 64  # requests served at once; more wait for a slot once their head is in
MAX_READING = 1024  # request bodies being read at once (each at most MAX_BODY, 30 s)
HEAD_TIMEOUT_S = 10.0  # a request head must arrive whole within this (of connecting, or of
# its first byte on a kept-alive connection), before it may wait for a slot
REQUEST_TIMEOUT_S = 30.0  # a request's body, once its head is in, must arrive within this
IDLE_TIMEOUT_S = 60.0  # a kept-alive connection with no new request is closed after this
SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long is dropped
RECEIVE_SIZE = 64 << 10

log = structlog.get_logger("meshllm.api")


class ApiUnavailable(MeshError):
    """The HTTP API cannot listen where it was told to."""


class ClientGone(Exception):
    """The client closed the connection, or stopped reading, before the response was sent."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]  # names in lower case
    body: bytes


class Responder:
    """The response to one request: one JSON body, or a stream of server-sent events."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream, method: str):
        self._conn = conn
        self._stream = stream
        self._head = method == "HEAD"
        self.state = "new"  # then "events" (a stream is open) or "done"
        # Added to whatever response is sent: the CORS headers of an allowed Origin.
        self.headers: list[tuple[str, str]] = []

    @property
    def started(self) -> bool:
        return self.state != "new"

    async def json(
        self, status: int, obj: Any, headers: list[tuple[str, str]] | None = None
    ) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        await self._start(
            status, "application/json", [("content-length", str(len(body))), *(headers or [])]
        )
        if not self._head:
            await self._send(h11.Data(data=body))
        await self._end()

    async def open_events(self) -> None:
        """Begin a ``text/event-stream`` response (chunked, or until close for HTTP/1.0)."""
        await self._start(200, "text/event-stream; charset=utf-8", [("cache-control", "no-cache")])
        self.state = "events"

    async def event(self, data: str) -> None:
        """One server-sent event: ``data: <data>`` and a blank line."""
        assert self.state == "events", self.state
        await self._send(h11.Data(data=f"data: {data}\n\n".encode()))

    async def close_events(self) -> None:
        await self._end()

    async def no_content(self, headers: list[tuple[str, str]]) -> None:
        """A 204: headers only."""
        await self._start(204, None, headers)
        await self._end()

    async def fail(self, err: ApiError) -> None:
        """Tell the client *err*: as the response, or as the last event of an open stream."""
        if self.state == "new":
            headers = list(err.headers)
            if self._conn.their_state is not h11.DONE:
                # The request was not read to its end: nothing more can be read after it.
                headers.append(("connection", "close"))
            await self.json(err.status, err.body(), headers)
        elif self.state == "events":
            await self.event(json.dumps(err.body(), separators=(",", ":")))
            await self._end()

    async def _start(
        self, status: int, content_type: str | None, headers: list[tuple[str, str]]
    ) -> None:
        if self.state != "new":
            raise RuntimeError("a response was already started")
        self.state = "started"
        all_headers = [
            *([("content-type", content_type)] if content_type else []),
            ("server", f"meshllm/{__version__}"),
            *self.headers,
            *headers,
        ]
        reason = HTTPStatus(status).phrase.encode()
        await self._send(h11.Response(status_code=status, headers=all_headers, reason=reason))

    async def _end(self) -> None:
        await self._send(h11.EndOfMessage())
        self.state = "done"

    async def _send(self, event: h11.Event) -> None:
        await _send(self._conn, self._stream, event)


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if not data:
        return
    try:
        with trio.fail_after(SEND_TIMEOUT_S):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        raise ClientGone() from None


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Timeout(Exception):
    """Nothing, or not the whole request, arrived in time."""

    def __init__(self, limit_s: float):
        super().__init__(limit_s)
        self.limit_s = limit_s


class HttpServer:
    """Serves *handler* on *host*:*port* (0: any free port), one task per connection.

    Requests must name this server in ``Host`` (or a name in *allowed_hosts*) and may come
    from web pages only at *allowed_origins* (see :class:`BrowserRules`).
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allowed_hosts: tuple[str, ...] = (),
        allowed_origins: tuple[str, ...] = (),
    ):
        self.handler = handler
        self.host = host
        self.port = port
        self.rules = BrowserRules(host, port, allowed_hosts, allowed_origins)
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._reading = trio.CapacityLimiter(MAX_READING)

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen; ``task_status.started((host, port))`` reports the port really bound."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise ApiUnavailable(
                f"the HTTP API cannot listen on {url_host(self.host)}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from None
        if self.port == 0 and len(listeners) > 1:
            # A name with several addresses (localhost: 127.0.0.1 and ::1) would get a
            # different free port on each: keep one, so that one address is the answer.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        port = listeners[0].socket.getsockname()[1]
        # Clients name the port really bound (port 0 picks one) in their Host header.
        self.rules = self.rules.on_port(port)
        try:
            task_status.started((self.host, port))
            await trio.serve_listeners(self.serve_connection, listeners)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Answer requests on *stream* until either side closes it; closes it at the end."""
        try:
            async with stream:
                await self._serve(stream)
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:  # a bug in answering: this connection ends, not the server
            log.exception("api_connection_failed", error=repr(exc))

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        idle_until: float | None = None  # the first request gets no idle allowance
        while True:
            responder = await self._exchange(conn, stream, idle_until)
            if responder is None:
                return
            if (
                responder.state != "done"
                or conn.our_state is h11.MUST_CLOSE
                or conn.their_state is not h11.DONE
            ):
                # The request was not read to its end (or could not be): nothing after it can.
                await self._hang_up(stream)
                return
            conn.start_next_cycle()
            idle_until = trio.current_time() + IDLE_TIMEOUT_S

    async def _exchange(
        self, conn: h11.Connection, stream: trio.abc.Stream, idle_until: float | None
    ) -> Responder | None:
        """One request and its response; None when the connection ended without a request.

        Only a request whose head arrived whole and passed the browser rules waits for a
        slot, and holds it until its response ends: waiting clients, silent or slow ones
        included, hold none (each costs a task and at most MAX_HEADERS bytes, for at most
        HEAD_TIMEOUT_S).
        """
        responder = Responder(conn, stream, "GET")
        err: ApiError | None = None
        try:
            head = await self._read_head(conn, stream, idle_until)
            if isinstance(head, h11.ConnectionClosed):
                return None
            responder = Responder(conn, stream, head.method.decode("ascii", "replace"))
            responder.headers = self.rules.admit(head)
            _check_body_head(head)
            # The body is read before a slot is taken, so clients that send theirs slowly
            # hold none either; at most MAX_READING of them (up to MAX_BODY each) at once.
            async with self._reading:
                request = await self._read_body(conn, stream, head)
            if request is None:
                return None
            async with self._slots:
                if _is_preflight(request):
                    await responder.no_content(self.rules.preflight_headers(request.headers))
                else:
                    await self.handler(request, responder)
                if not responder.started:
                    raise RuntimeError(f"no response to {request.method} {request.path}")
        except h11.RemoteProtocolError as exc:
            err = ApiError(exc.error_status_hint, f"malformed HTTP request: {exc}", code="bad_http")
        except _Timeout as exc:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return None  # nothing was sent (or an idle kept-alive connection): just close
            err = ApiError(
                408, f"the request did not arrive within {exc.limit_s:g} s", code="request_timeout"
            )
        except ApiError as exc:
            err = exc
        except ClientGone:
            raise
        except Exception as exc:  # a bug: logged, answered, and the server goes on
            log.exception("api_handler_failed", error=repr(exc))
            err = ApiError(
                500, f"internal error: {type(exc).__name__}: {exc}", SERVER, "internal_error"
            )
        if err is not None:
            if conn.their_state is not h11.DONE:
                log.info("api_request_refused", status=err.status, reason=err.message)
            await responder.fail(err)
        return responder

    async def _read_head(
        self, conn: h11.Connection, stream: trio.abc.Stream, idle_until: float | None
    ) -> h11.Request | h11.ConnectionClosed:
        """The next request's head, within HEAD_TIMEOUT_S of connecting; a kept-alive
        connection (*idle_until* set) may first wait until then for the next request's
        first byte, and has HEAD_TIMEOUT_S from there."""
        if idle_until is not None and not conn.trailing_data[0]:
            with trio.move_on_at(idle_until):
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))  # b"": closed
            if not conn.trailing_data[0] and not conn.trailing_data[1]:
                raise _Timeout(IDLE_TIMEOUT_S)
        deadline = trio.current_time() + HEAD_TIMEOUT_S
        event = await self._next_event(conn, stream, deadline, HEAD_TIMEOUT_S)
        assert isinstance(event, h11.Request | h11.ConnectionClosed), event
        return event

    async def _read_body(
        self, conn: h11.Connection, stream: trio.abc.Stream, head: h11.Request
    ) -> Request | None:
        """The request of *head*, body and all; None when the client closed the connection."""
        deadline = trio.current_time() + REQUEST_TIMEOUT_S
        if conn.they_are_waiting_for_100_continue:
            await _send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = await self._next_event(conn, stream, deadline, REQUEST_TIMEOUT_S)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise ApiError(
                        413, f"the request body is over {MAX_BODY} bytes", code="body_too_large"
                    )
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-body
                return None
        target = head.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        method = head.method.decode("ascii", "replace")
        return Request(method, path, query, _header_map(head), bytes(body))

    @staticmethod
    async def _next_event(
        conn: h11.Connection, stream: trio.abc.Stream, deadline: float, limit_s: float
    ) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)  # b"": the client closed its side
                continue
            raise _Timeout(limit_s)

    @staticmethod
    async def _hang_up(stream: trio.abc.Stream) -> None:
        """Close politely: closing with unread input would reset the connection, and the
        client could lose the answer it has not read yet."""
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            with trio.move_on_after(2):
                while await stream.receive_some(RECEIVE_SIZE):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _is_preflight(request: Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "origin" in request.headers
        and "access-control-request-method" in request.headers
    )


def _check_body_head(head: h11.Request) -> None:
    """Refuse a body before reading it: one that is not JSON, or too large."""
    headers = _header_map(head)
    if head.method == b"POST":
        # Browsers send a form's or a text/plain body cross-site without a preflight; a
        # JSON body from a page needs one, which only allowed origins pass.
        content_type = headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise ApiError(
                415,
                f"a POST body must be sent as Content-Type: application/json, "
                f"not {content_type[:100] or 'without one'}",
                code="unsupported_media_type",
            )
    declared = headers.get("content-length")
    if declared is not None and int(declared) > MAX_BODY:  # h11 checked it is a number
        raise ApiError(
            413,
            f"the request body is {declared} bytes; at most {MAX_BODY} are accepted",
            code="body_too_large",
        )


def _header_map(head: h11.Request) -> dict[str, str]:
    """Header names (h11 gives them in lower case) to values; the last of repeated ones."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
