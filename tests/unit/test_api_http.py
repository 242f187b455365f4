"""The OpenAI-compatible HTTP API against a fake mesh: routing, request parsing, SSE framing,
and an OpenAI error object with the right status for everything a client can get wrong.

The server runs in-process on trio's in-memory streams (and once on a loopback socket);
the client side speaks HTTP with h11, or sends raw bytes where the request is malformed.
The browser rules (Host, Origin, Content-Type) and the slots that silent or slow clients
must not take are at the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trio.testing

from meshllm.api.browser import BrowserRules
from meshllm.api.http import (
    HEAD_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    MAX_BODY,
    MAX_CONNECTIONS,
    HttpServer,
)
from meshllm.api.openai import OpenAIApi
from meshllm.config import ConfigError, parse_config
from meshllm.errors import Busy, NotReady, NotServing, QueryFailed, TooLarge
from meshllm.model.sampling import SamplingParams
from meshllm.model.tokenizer import ChatTemplateError
from meshllm.pipeline.coordinator import QueryResult
from meshllm.pipeline.gateway import ReadyModel

EOS = 0
PORT = 8080  # the port the in-memory server believes it listens on
HOST = f"127.0.0.1:{PORT}"  # what a client that dialled it sends as Host
MODEL = "fake-model"
ANSWER = "Hello there, world!"
MAX_NEW = 64


class FakeTokenizer:
    """One token per character; token 0 is the end of the answer."""

    def encode_messages(self, messages):
        if any(m["content"] == "untemplatable" for m in messages):
            raise ChatTemplateError("the model's chat template cannot render this: roles!")
        return self.encode_prompt("".join(f"<{m['role']}>{m['content']}" for m in messages))

    def encode_prompt(self, prompt, *, raw=False):
        return [ord(c) for c in prompt]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != EOS)


@dataclass
class FakeMesh:
    """Generates ANSWER (then EOS) one token at a time, like the coordinator."""

    answer: str = ANSWER
    served: str | None = MODEL
    error: Exception | None = None  # raised instead of generating
    fail_after: int | None = None  # raise `error` after this many tokens
    calls: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    aborted: trio.Event = field(default_factory=trio.Event)  # a generation was cut short

    def served_model(self):
        return self.served

    def model_names(self):
        return sorted({"other-model", *([self.served] if self.served else [])})

    def ready_model(self):
        if self.served is None:
            raise NotServing("no model is served: run `meshllm serve MODEL`")
        return ReadyModel(self.served, self.tokenizer)

    async def generate(self, prompt_ids, *, max_tokens, sampling, on_token=None):
        call = {
            "prompt_ids": prompt_ids,
            "max_tokens": max_tokens,
            "sampling": sampling,
            "generated": 0,
            "aborted": False,
        }
        self.calls.append(call)
        if self.error is not None and self.fail_after is None:
            raise self.error
        tokens = [ord(c) for c in self.answer] + [EOS]
        out: list[int] = []
        finish = "length"
        try:
            for token in tokens[:max_tokens]:
                if self.fail_after is not None and len(out) == self.fail_after:
                    assert self.error is not None
                    raise self.error
                await trio.sleep(0)
                out.append(token)
                call["generated"] = len(out)
                if on_token is not None and await on_token(token):
                    finish = "stop"
                    break
                if token == EOS:
                    finish = "stop"
                    break
        except BaseException:
            call["aborted"] = True
            self.aborted.set()
            raise
        return QueryResult(
            token_ids=out,
            prompt_tokens=len(prompt_ids),
            finish_reason=finish,
            ttft_s=0.0,
            decode_tokens_per_s=0.0,
            total_s=0.0,
            plan_epoch=1,
        )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The data of each server-sent event; the framing must be exact."""
        text = self.body.decode()
        assert text.endswith("\n\n"), text[-40:]
        blocks = text[:-2].split("\n\n")
        assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
        return [b.removeprefix("data: ") for b in blocks]

    def error(self) -> dict[str, Any]:
        body = self.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"]
        return body["error"]


class Client:
    """HTTP/1.1 over one connection, with keep-alive."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def request(
        self, method: str, path: str, body: Any = None, headers: list[tuple[str, str]] | None = None
    ) -> Reply:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        hdrs = list(headers or [])
        names = {name.lower() for name, _ in hdrs}
        if "host" not in names:
            hdrs.insert(0, ("host", HOST))
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
            if "content-type" not in names:
                hdrs.append(("content-type", "application/json"))
        await self.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        status, headers, body = 0, {}, b""
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(status, headers, body)


@asynccontextmanager
async def api(mesh: FakeMesh | None = None, **rules: Any) -> AsyncIterator[Any]:
    """A server with its own connections: ``connect()`` gives a new client stream.
    *rules*: allowed_hosts, allowed_origins."""
    server = HttpServer(
        OpenAIApi(mesh or FakeMesh(), max_new_tokens=MAX_NEW), "127.0.0.1", PORT, **rules
    )
    async with trio.open_nursery() as nursery:

        def connect() -> trio.abc.Stream:
            client, server_side = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_connection, server_side)
            return client

        yield connect
        nursery.cancel_scope.cancel()


async def call(
    method: str,
    path: str,
    body: Any = None,
    mesh: FakeMesh | None = None,
    headers: list[tuple[str, str]] | None = None,
    **rules: Any,
) -> Reply:
    async with api(mesh, **rules) as connect:
        return await Client(connect()).request(method, path, body, headers)


async def raw(data: bytes, mesh: FakeMesh | None = None, patience: float = 5) -> bytes:
    """Send *data* as is; everything the server says until it hangs up."""
    async with api(mesh) as connect:
        stream = connect()
        await stream.send_all(data)
        out = b""
        with trio.fail_after(patience):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


def raw_json(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


# -- routes ---------------------------------------------------------------------------------
async def test_models_lists_the_served_model_first():
    reply = await call("GET", "/v1/models")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["object"] == "list"
    assert [(m["id"], m["served"]) for m in body["data"]] == [(MODEL, True), ("other-model", False)]
    assert all(m["object"] == "model" and m["owned_by"] == "meshllm" for m in body["data"])
    one = await call("GET", f"/v1/models/{MODEL}")
    assert one.status == 200 and one.json()["id"] == MODEL
    missing = await call("GET", "/v1/models/nope")
    assert missing.status == 404 and missing.error()["code"] == "model_not_found"


async def test_chat_completion():
    mesh = FakeMesh()
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}],
            },
            {"role": "assistant", "content": "Hello?"},
            {"role": "developer", "content": "Terse."},
        ],
    }
    reply = await call("POST", "/v1/chat/completions", body, mesh)
    assert reply.status == 200
    out = reply.json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    assert out["id"].startswith("chatcmpl-") and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": ANSWER, "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    # Text parts are joined as lines; "developer" is the template's "system".
    prompt = "<system>Be brief.<user>Hi\nyou<assistant>Hello?<system>Terse."
    (gen,) = mesh.calls
    assert gen["prompt_ids"] == [ord(c) for c in prompt]
    completion = len(ANSWER) + 1  # the end-of-sequence token counts
    assert out["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": completion,
        "total_tokens": len(prompt) + completion,
    }
    # No max_tokens: up to the peer's limit. OpenAI's default sampling: temperature 1.
    assert gen["max_tokens"] == MAX_NEW
    assert gen["sampling"] == SamplingParams(temperature=1.0, top_p=1.0)


async def test_sampling_parameters_reach_the_mesh():
    mesh = FakeMesh()
    body = {
        **CHAT,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
        "top_k": 3,
        "max_completion_tokens": 5,
    }
    out = (await call("POST", "/v1/chat/completions", body, mesh)).json()
    assert mesh.calls[0]["sampling"] == SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=7)
    assert mesh.calls[0]["sampling"].greedy
    assert mesh.calls[0]["max_tokens"] == 5
    assert out["choices"][0]["message"]["content"] == ANSWER[:5]
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5


async def test_chat_stream_is_server_sent_events():
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    reply = await call("POST", "/v1/chat/completions", body)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["transfer-encoding"] == "chunked"
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == ANSWER
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ANSWER) + 1
    assert all("usage" not in c for c in chunks[:-1])


async def test_completions_with_and_without_stream():
    mesh = FakeMesh()
    reply = await call("POST", "/v1/completions", {"model": MODEL, "prompt": "Once"}, mesh)
    out = reply.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    # OpenAI's legacy default: 16 tokens.
    assert out["choices"] == [
        {"index": 0, "text": ANSWER[:16], "logprobs": None, "finish_reason": "length"}
    ]
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
    assert mesh.calls[0]["prompt_ids"] == [ord(c) for c in "Once"]  # no chat template
    reply = await call(
        "POST", "/v1/completions", {"prompt": ["Once"], "stream": True, "max_tokens": 40}
    )
    events = reply.events()
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences_cut_the_text_and_end_generation(stream):
    mesh = FakeMesh()
    body = {**CHAT, "stop": ["nothing", "re, w"], "stream": stream}
    reply = await call("POST", "/v1/chat/completions", body, mesh)
    if stream:
        chunks = [json.loads(e) for e in reply.events()[:-1]]
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        text, finish = "".join(deltas), chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = reply.json()["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    assert text == "Hello the" and finish == "stop"
    # The mesh stopped at the token that completed the stop sequence.
    assert mesh.calls[0]["generated"] == len("Hello there, w")


async def test_keep_alive_and_100_continue():
    async with api() as connect:
        client = Client(connect())
        first = await client.request("GET", "/v1/models")
        second = await client.request(
            "POST", "/v1/chat/completions", CHAT, headers=[("expect", "100-continue")]
        )
        third = await client.request("GET", "/v1/nope")
        assert [first.status, second.status, third.status] == [200, 200, 404]


async def test_loopback_socket_reports_the_bound_port():
    server = HttpServer(OpenAIApi(FakeMesh(), max_new_tokens=MAX_NEW), "127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run)
        assert host == "127.0.0.1" and port > 0
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            # The port really bound is the one clients name in Host.
            client = Client(stream)
            reply = await client.request("GET", "/v1/models", headers=[("host", f"{host}:{port}")])
            assert reply.status == 200 and reply.json()["data"][0]["id"] == MODEL
            asked_for = await client.request("GET", "/v1/models", headers=[("host", "127.0.0.1:0")])
            assert asked_for.status == 421
        nursery.cancel_scope.cancel()


# -- what clients get wrong -----------------------------------------------------------------
def chat(**changes: Any) -> dict[str, Any]:
    return {**CHAT, **changes}


BAD_REQUESTS = [
    # (method, path, body, status, code, param)
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json", None),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, "invalid_json", None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    (
        "POST",
        "/v1/chat/completions",
        b'{"temperature": NaN, "messages": []}',
        400,
        "invalid_json",
        None,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL},
        400,
        "missing_required_parameter",
        "messages",
    ),
    ("POST", "/v1/chat/completions", chat(messages=[]), 400, "invalid_value", "messages"),
    ("POST", "/v1/chat/completions", chat(messages=["hi"]), 400, "invalid_value", "messages[0]"),
    (
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "invalid_value",
        "messages[0].content",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user"}]),
        400,
        "invalid_value",
        "messages[0].content",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "42"}]),
        400,
        "unsupported_parameter",
        "messages[0].role",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        "unsupported_parameter",
        "messages[0].content[0]",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "untemplatable"}]),
        400,
        "invalid_value",
        "messages",
    ),
    ("POST", "/v1/chat/completions", chat(n=2), 400, "unsupported_parameter", "n"),
    ("POST", "/v1/chat/completions", chat(n=True), 400, "unsupported_parameter", "n"),
    (
        "POST",
        "/v1/chat/completions",
        chat(tools=[{"type": "function"}]),
        400,
        "unsupported_parameter",
        "tools",
    ),
    ("POST", "/v1/chat/completions", chat(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    (
        "POST",
        "/v1/chat/completions",
        chat(presence_penalty=0.5),
        400,
        "unsupported_parameter",
        "presence_penalty",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}),
        400,
        "unsupported_parameter",
        "response_format",
    ),
    ("POST", "/v1/chat/completions", chat(temprature=0), 400, "unknown_parameter", "temprature"),
    ("POST", "/v1/chat/completions", chat(temperature=3), 400, "invalid_value", "temperature"),
    ("POST", "/v1/chat/completions", chat(temperature="hot"), 400, "invalid_value", "temperature"),
    ("POST", "/v1/chat/completions", chat(top_p=0), 400, "invalid_value", "top_p"),
    ("POST", "/v1/chat/completions", chat(seed=-1), 400, "invalid_value", "seed"),
    ("POST", "/v1/chat/completions", chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/chat/completions", chat(max_tokens="5"), 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/chat/completions", chat(max_tokens=True), 400, "invalid_value", "max_tokens"),
    (
        "POST",
        "/v1/chat/completions",
        chat(max_tokens=4, max_completion_tokens=5),
        400,
        "invalid_value",
        "max_tokens",
    ),
    ("POST", "/v1/chat/completions", chat(stream="yes"), 400, "invalid_value", "stream"),
    (
        "POST",
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        "invalid_value",
        "stream_options",
    ),
    (
        "POST",
        "/v1/chat/completions",
        chat(stop=["a", "b", "c", "d", "e"]),
        400,
        "invalid_value",
        "stop",
    ),
    ("POST", "/v1/chat/completions", chat(stop=[""]), 400, "invalid_value", "stop"),
    ("POST", "/v1/chat/completions", chat(model=""), 400, "invalid_value", "model"),
    ("POST", "/v1/chat/completions", chat(model="gpt-4o"), 404, "model_not_found", "model"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 2, 3]}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {}, 400, "missing_required_parameter", "prompt"),
    (
        "POST",
        "/v1/completions",
        {"prompt": "x", "echo": True},
        400,
        "unsupported_parameter",
        "echo",
    ),
    (
        "POST",
        "/v1/completions",
        {"prompt": "x", "messages": []},
        400,
        "unknown_parameter",
        "messages",
    ),
    ("GET", "/v1/chat", None, 404, "unknown_url", None),
    ("GET", "/", None, 404, "unknown_url", None),
    ("GET", "/v1/chat/completions", None, 405, "method_not_allowed", None),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "param"), BAD_REQUESTS)
async def test_bad_requests_get_openai_error_objects(method, path, body, status, code, param):
    mesh = FakeMesh()
    async with api(mesh) as connect:
        client = Client(connect())
        reply = await client.request(method, path, body)
        assert reply.status == status, reply.body
        err = reply.error()
        assert (err["code"], err["param"]) == (code, param), err
        assert err["type"] == "invalid_request_error"
        if status == 405:
            assert reply.headers["allow"] in ("GET", "POST")
        # Nothing was generated, and the same connection still serves.
        assert mesh.calls == []
        assert (await client.request("GET", "/v1/models")).status == 200


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (
            Busy("this peer is already coordinating 16 queries"),
            429,
            "rate_limit_error",
        ),
        (NotReady("the mesh is still loading m; try again"), 503, "server_error"),
        (QueryFailed("a stage is gone"), 503, "server_error"),
        (
            TooLarge("max_tokens 9999 is over this peer's limit of 2048"),
            400,
            "invalid_request_error",
        ),
        (RuntimeError("a bug"), 500, "server_error"),
    ],
)
async def test_mesh_errors_map_to_status_codes(error, status, kind):
    mesh = FakeMesh(error=error)
    async with api(mesh) as connect:
        client = Client(connect())
        reply = await client.request("POST", "/v1/chat/completions", CHAT)
        assert reply.status == status
        err = reply.error()
        assert err["type"] == kind and str(error) in err["message"]
        if status in (429, 503) and error.code != "query_failed":
            assert int(reply.headers["retry-after"]) >= 1
        mesh.error = None
        assert (await client.request("POST", "/v1/chat/completions", CHAT)).status == 200


async def test_nothing_served_is_503():
    reply = await call("POST", "/v1/chat/completions", CHAT, FakeMesh(served=None))
    assert reply.status == 503 and reply.error()["code"] == "not_serving"


async def test_failure_mid_stream_ends_the_stream_with_an_error_event():
    mesh = FakeMesh(error=QueryFailed("the mesh cannot go on"), fail_after=3)
    reply = await call("POST", "/v1/chat/completions", {**CHAT, "stream": True}, mesh)
    assert reply.status == 200
    events = reply.events()
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "query_failed"


async def test_body_too_large_is_413_and_the_connection_closes():
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
        f"content-length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    status, body = raw_json(await raw(head + b"x" * 1000))
    assert status == 413 and body["error"]["code"] == "body_too_large"
    # Chunked, so the size is only known while reading.
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json"
        f"\r\ntransfer-encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
    status, body = raw_json(await raw(head + chunk * 17 + b"0\r\n\r\n"))
    assert status == 413 and body["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nhost: " + HOST.encode() + b"\r\n"
        b"content-type: application/json\r\ncontent-length: nope\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n" + b"x-long: " + b"a" * 70000 + b"\r\n\r\n",
    ],
)
async def test_malformed_http_gets_an_error_and_a_hang_up(data):
    status, body = raw_json(await raw(data))
    assert status in (400, 431) and body["error"]["code"] == "bad_http"


async def test_slow_or_idle_clients_are_dropped(autojump_clock):
    # Half a request, then nothing: 408. An idle kept-alive connection just closes.
    patience = 2 * IDLE_TIMEOUT_S  # on the virtual clock: past every server deadline
    status, body = raw_json(
        await raw(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n", patience=patience)
    )
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert await raw(b"", patience=patience) == b""


async def test_a_client_that_goes_away_mid_stream_stops_generation():
    mesh = FakeMesh(answer="x" * 50)
    async with api(mesh) as connect:
        stream = connect()
        client = Client(stream)
        body = json.dumps({**CHAT, "stream": True}).encode()
        await client.send(
            h11.Request(
                method="POST",
                target="/v1/chat/completions",
                headers=[
                    ("host", HOST),
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                ],
            )
        )
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
        with trio.fail_after(5):
            await stream.receive_some(1)  # the stream has begun
        await stream.aclose()
        with trio.fail_after(5):
            await mesh.aborted.wait()
        assert mesh.calls[0]["generated"] < 50
        # The server goes on serving others.
        assert (await Client(connect()).request("GET", "/v1/models")).status == 200


# -- browser rules: what a web page can make a visitor's browser do -------------------------
async def test_a_rebound_host_name_is_refused():
    # DNS rebinding: a page at http://evil.example:8080 re-points its name at 127.0.0.1; the
    # browser then sends Host: evil.example:8080 and would let the page read the answer.
    mesh = FakeMesh()
    refused = ("evil.example:8080", "evil.example", "localhost:9999", "127.0.0.1", "10.0.0.1:8080")
    for host in refused:
        reply = await call("POST", "/v1/chat/completions", CHAT, mesh, [("host", host)])
        assert reply.status == 421, host
        assert reply.error()["code"] == "invalid_host" and reply.headers["connection"] == "close"
    assert mesh.calls == []
    for host in ("127.0.0.1:8080", "localhost:8080", "LocalHost.:8080", "[::1]:8080"):
        assert (await call("GET", "/v1/models", headers=[("host", host)])).status == 200, host


async def test_a_request_without_host_is_refused():
    # HTTP/1.0 allows leaving Host out; the name the client used then cannot be checked.
    status, body = raw_json(await raw(b"GET /v1/models HTTP/1.0\r\n\r\n"))
    assert status == 421 and body["error"]["code"] == "invalid_host"


async def test_allowed_hosts_are_accepted():
    rules = {"allowed_hosts": ("my-box.local", "proxy.example:9000")}
    for host in ("my-box.local:8080", "my-box.local:1234", "MY-BOX.local", "proxy.example:9000"):
        reply = await call("GET", "/v1/models", headers=[("host", host)], **rules)
        assert reply.status == 200, host
    reply = await call("GET", "/v1/models", headers=[("host", "proxy.example:9001")], **rules)
    assert reply.status == 421


@pytest.mark.parametrize(
    ("listen", "host", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:8080", True),
        ("127.0.0.1", "[0:0::1]:8080", True),  # one address, several spellings
        ("127.0.0.1", "127.0.0.1:80", False),
        ("::1", "localhost:8080", True),
        ("localhost", "127.0.0.1:8080", True),
        ("192.168.1.5", "192.168.1.5:8080", True),
        ("192.168.1.5", "localhost:8080", False),  # not listening there
        ("my-box.local", "my-box.local:8080", True),
        ("my-box.local", "other.local:8080", False),
        ("0.0.0.0", "192.168.1.5:8080", True),  # every address of the machine
        ("::", "[fe80::1]:8080", True),
        ("0.0.0.0", "evil.example:8080", False),  # but no name a page's owner controls
        ("127.0.0.1", "127.0.0.1:8080:1", False),
        ("127.0.0.1", "[127.0.0.1]:8080", False),
        ("127.0.0.1", "user@127.0.0.1:8080", False),
        ("127.0.0.1", "", False),
    ],
)
def test_host_rules(listen, host, allowed):
    assert BrowserRules(listen, PORT).host_allowed(host) is allowed


async def test_a_cross_site_origin_is_refused():
    mesh = FakeMesh()
    for origin in ("http://evil.example", "null", "http://localhost:3000"):
        reply = await call("POST", "/v1/chat/completions", CHAT, mesh, [("origin", origin)])
        assert reply.status == 403, origin
        assert reply.error()["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in reply.headers
    assert mesh.calls == []
    # Reading is refused too: a page cannot list the models.
    reply = await call("GET", "/v1/models", headers=[("origin", "http://evil.example")])
    assert reply.status == 403


async def test_an_allowed_origin_gets_cors_headers():
    page = "http://localhost:3000"
    async with api(allowed_origins=(page, "https://chat.example")) as connect:
        client = Client(connect())
        for origin in (page, "https://chat.example:443"):  # the default port is implied
            reply = await client.request("POST", "/v1/chat/completions", CHAT, [("origin", origin)])
            assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"]
            assert reply.headers["access-control-allow-origin"] == origin
            assert reply.headers["vary"] == "origin"
        # Errors too, so that the page can show them.
        reply = await client.request("GET", "/v1/nope", headers=[("origin", page)])
        assert reply.status == 404 and reply.headers["access-control-allow-origin"] == page
        other = await call(
            "GET",
            "/v1/models",
            headers=[("origin", "http://localhost:3001")],
            allowed_origins=(page,),
        )
        assert other.status == 403


async def test_preflight_is_answered_for_allowed_origins_only():
    page = "http://localhost:3000"
    preflight = [
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization, content-type"),
    ]
    async with api(allowed_origins=(page,)) as connect:
        client = Client(connect())
        reply = await client.request(
            "OPTIONS", "/v1/chat/completions", headers=[("origin", page), *preflight]
        )
        assert reply.status == 204 and reply.body == b""
        assert reply.headers["access-control-allow-origin"] == page
        assert "POST" in reply.headers["access-control-allow-methods"]
        assert reply.headers["access-control-allow-headers"] == "authorization, content-type"
        # The request it cleared follows on the same connection.
        reply = await client.request("POST", "/v1/chat/completions", CHAT, [("origin", page)])
        assert reply.status == 200
        cross_site = [("origin", "http://evil.example"), *preflight]
        refused = await Client(connect()).request("OPTIONS", "/v1/models", None, cross_site)
        assert refused.status == 403 and "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # what a cross-site form or fetch sends without a preflight
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        None,
    ],
)
async def test_a_post_that_is_not_json_is_refused(content_type):
    mesh = FakeMesh()
    headers = [("content-type", content_type)] if content_type else []
    async with api(mesh) as connect:
        stream = connect()
        body = json.dumps(CHAT).encode()
        head = [("host", HOST), *headers, ("content-length", str(len(body)))]
        client = Client(stream)
        await client.send(h11.Request(method="POST", target="/v1/chat/completions", headers=head))
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
        reply = await client.read_reply()
    assert reply.status == 415 and reply.error()["code"] == "unsupported_media_type"
    assert mesh.calls == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
async def test_json_with_parameters_is_accepted(content_type):
    headers = [("content-type", content_type)]
    reply = await call("POST", "/v1/chat/completions", CHAT, headers=headers)
    assert reply.status == 200


# -- silent, slow and idle clients take no slot ---------------------------------------------
async def _dribble(stream: trio.abc.Stream, data: bytes) -> None:
    """Send *data* a byte a second, as a slow-loris client does; stop when cut off."""
    try:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.sleep(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


ENDLESS_HEAD = b"GET /v1/models HTTP/1.1\r\nhost: " + HOST.encode() + b"\r\n" + b"x-pad: a" * 1000


async def _read_to_end(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


@pytest.mark.parametrize("kind", ["silent", "dribbling", "kept_alive"])
async def test_idle_clients_do_not_starve_a_real_one(kind, autojump_clock):
    async with api() as connect, trio.open_nursery() as clients:
        idle = [connect() for _ in range(MAX_CONNECTIONS + 6)]
        for stream in idle:
            if kind == "dribbling":
                clients.start_soon(_dribble, stream, ENDLESS_HEAD)
            elif kind == "kept_alive":  # one answered request, then nothing
                with trio.fail_after(1):
                    assert (await Client(stream).request("GET", "/v1/models")).status == 200
        await trio.testing.wait_all_tasks_blocked()  # each idle connection is being served
        with trio.fail_after(1):  # virtual seconds: answered at once, not after a timeout
            reply = await Client(connect()).request("POST", "/v1/chat/completions", CHAT)
        assert reply.status == 200
        # And the idle ones are closed in time (a head that never ends gets a 408).
        limit = IDLE_TIMEOUT_S if kind == "kept_alive" else 0
        with trio.fail_after(limit + HEAD_TIMEOUT_S + 1):
            for stream in idle:
                said = await _read_to_end(stream)
                assert said.startswith(b"HTTP/1.1 408 ") if kind == "dribbling" else said == b""
        clients.cancel_scope.cancel()


@pytest.mark.parametrize("kept_alive", [False, True])
async def test_a_slow_loris_head_is_cut_off(kept_alive, autojump_clock):
    async with api() as connect, trio.open_nursery() as clients:
        stream = connect()
        if kept_alive:
            with trio.fail_after(1):
                assert (await Client(stream).request("GET", "/v1/models")).status == 200
        start = trio.current_time()
        clients.start_soon(_dribble, stream, ENDLESS_HEAD)
        with trio.fail_after(HEAD_TIMEOUT_S + 1):
            said = await _read_to_end(stream)
        status, body = raw_json(said)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert trio.current_time() - start == pytest.approx(HEAD_TIMEOUT_S, abs=1)
        clients.cancel_scope.cancel()


# -- [api] in config.toml -------------------------------------------------------------------
def test_api_section_takes_allowed_hosts_and_origins():
    api = parse_config(
        '[api]\nallowed_hosts = ["my-box.local", "localhost:3000", "[::1]:8080"]\n'
        'allowed_origins = ["http://localhost:3000", "https://[::1]", "chrome-extension://abc"]'
    ).api
    assert api.allowed_hosts == ("my-box.local", "localhost:3000", "[::1]:8080")
    assert api.allowed_origins[0] == "http://localhost:3000"
    assert parse_config("").api.allowed_hosts == parse_config("").api.allowed_origins == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowed_hosts = ["a b"]', "allowed_hosts: 'a b' is not HOST"),
        ('allowed_hosts = ["x:0"]', "is not HOST"),
        ('allowed_hosts = ["http://x"]', "is not HOST"),
        ('allowed_hosts = "x"', "expected a list"),
        ('allowed_origins = ["http://x/"]', "allowed_origins: 'http://x/' is not SCHEME"),
        ('allowed_origins = ["null"]', "is not SCHEME"),
        ('allowed_origins = ["*"]', "is not SCHEME"),
        ('allowed_origins = ["localhost:3000"]', "is not SCHEME"),
        ('allowed_origin = ["http://x"]', "unknown key 'allowed_origin'"),
    ],
)
def test_api_section_refuses_bad_allowed_lists(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(f"[api]\n{text}")
