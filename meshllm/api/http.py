"""A small HTTP/1.1 server on trio and h11: requests with bounded bodies in, JSON or
server-sent events out, keep-alive, and an error object for whatever a client gets wrong.

It knows nothing of OpenAI: a handler gets each :class:`Request` with a :class:`Responder`
and either answers through it or raises :class:`ApiError`. A handler's bug becomes a 500 and
is logged; the server itself keeps serving whatever clients send.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import structlog
import trio

from meshllm import __version__
from meshllm.api.errors import SERVER, ApiError
from meshllm.errors import MeshError

MAX_BODY = 1 << 20  # as large as a control-socket request line
MAX_HEADERS = 16 << 10
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 30.0  # a request, once begun, must arrive whole within this
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

    async def _start(self, status: int, content_type: str, headers: list[tuple[str, str]]) -> None:
        if self.state != "new":
            raise RuntimeError("a response was already started")
        self.state = "started"
        all_headers = [
            ("content-type", content_type),
            ("server", f"meshllm/{__version__}"),
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


class HttpServer:
    """Serves *handler* on *host*:*port* (0: any free port), one task per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0):
        self.handler = handler
        self.host = host
        self.port = port
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

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
        try:
            task_status.started((self.host, port))
            await trio.serve_listeners(self.serve_connection, listeners)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Answer requests on *stream* until either side closes it; closes it at the end."""
        async with self._slots:
            try:
                async with stream:
                    await self._serve(stream)
            except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as exc:  # a bug in answering: this connection ends, not the server
                log.exception("api_connection_failed", error=repr(exc))

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        while True:
            responder = Responder(conn, stream, "GET")
            err: ApiError | None = None
            try:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                responder = Responder(conn, stream, request.method)
                await self.handler(request, responder)
                if not responder.started:
                    raise RuntimeError(f"no response to {request.method} {request.path}")
            except h11.RemoteProtocolError as exc:
                err = ApiError(exc.error_status_hint, f"malformed HTTP request: {exc}",
                               code="bad_http")  # fmt: skip
            except _Timeout:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return  # an idle kept-alive connection: just close it
                err = ApiError(408, f"the request did not arrive within {REQUEST_TIMEOUT_S:g} s",
                               code="request_timeout")  # fmt: skip
            except ApiError as exc:
                err = exc
            except ClientGone:
                raise
            except Exception as exc:  # a bug: logged, answered, and the server goes on
                log.exception("api_handler_failed", error=repr(exc))
                err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", SERVER,
                               "internal_error")  # fmt: skip
            if err is not None:
                if conn.their_state is not h11.DONE:
                    log.info("api_request_refused", status=err.status, reason=err.message)
                await responder.fail(err)
            if (responder.state != "done" or conn.our_state is h11.MUST_CLOSE
                    or conn.their_state is not h11.DONE):  # fmt: skip
                # The request was not read to its end (or could not be): nothing after it can.
                await self._hang_up(stream)
                return
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
        """The next request, body and all; None when the client closed the connection."""
        event = await self._next_event(conn, stream, trio.current_time() + IDLE_TIMEOUT_S)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        deadline = trio.current_time() + REQUEST_TIMEOUT_S
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        declared = headers.get("content-length")
        if declared is not None and int(declared) > MAX_BODY:  # h11 checked it is a number
            raise ApiError(
                413,
                f"the request body is {declared} bytes; at most {MAX_BODY} are accepted",
                code="body_too_large",
            )
        if conn.they_are_waiting_for_100_continue:
            await _send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = await self._next_event(conn, stream, deadline)
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
        path, _, query = target.partition("?")
        return Request(method, path, query, headers, bytes(body))

    @staticmethod
    async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, deadline: float) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)  # b"": the client closed its side
                continue
            raise _Timeout()

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


def url_host(host: str) -> str:
    """*host* as it goes in a URL (IPv6 addresses in brackets)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
