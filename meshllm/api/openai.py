"""The OpenAI routes: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``.

Generation goes through a :class:`Backend`: in the daemon, the serving service, so that a
request here meets the same limits, errors and coordinator as a control-socket ``query``.

The ``model`` of a request may be left out (whichever model is served answers) or must name
the served model: another name is a 404, as OpenAI answers for an unknown model.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from meshllm.api import schema
from meshllm.api.errors import SERVER, ApiError, from_refusal
from meshllm.api.http import Request, Responder
from meshllm.api.text import TextOutput
from meshllm.errors import MeshError, Refused
from meshllm.model.sampling import SamplingParams
from meshllm.model.tokenizer import ChatTemplateError


class Tokenizer(Protocol):
    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...
    def encode_prompt(self, prompt: str, *, raw: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class Ready(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer: ...


class Generated(Protocol):
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> str: ...  # "stop" or "length"


class Backend(Protocol):
    """What the API needs of the mesh (``QueryGateway`` in the daemon). Errors are
    :class:`~meshllm.errors.Refused`, each with its code."""

    def served_model(self) -> str | None: ...
    def model_names(self) -> list[str]: ...
    def ready_model(self) -> Ready: ...
    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: Any,
        sampling: SamplingParams,
        on_token: Callable[[int], Awaitable[bool | None]] | None = None,
    ) -> Generated: ...


Route = Callable[[Request, Responder], Awaitable[None]]


class OpenAIApi:
    """The request handler for :class:`meshllm.api.http.HttpServer`."""

    def __init__(self, backend: Backend, *, max_new_tokens: int):
        self.backend = backend
        # A chat request without max_tokens may generate up to the peer's limit (and the
        # model's context), as OpenAI's chat completions go on to the context's end.
        self.max_new_tokens = max_new_tokens
        self.created = int(time.time())
        self._routes: dict[str, dict[str, Route]] = {
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completion},
        }

    async def __call__(self, request: Request, respond: Responder) -> None:
        methods = self._routes.get(request.path)
        if methods is None and request.path.startswith("/v1/models/"):
            methods = {"GET": self._model}
        if methods is None:
            raise ApiError(
                404,
                f"Invalid URL ({request.method} {request.path}): the routes are "
                f"{', '.join(self._routes)}",
                code="unknown_url",
            )
        route = methods.get(request.method) or (
            methods.get("GET") if request.method == "HEAD" else None
        )
        if route is None:
            allowed = ", ".join(methods)
            raise ApiError(
                405,
                f"{request.path} accepts {allowed}, not {request.method}",
                code="method_not_allowed",
                headers=(("allow", allowed),),
            )
        await route(request, respond)

    # -- models -------------------------------------------------------------------------------
    def _model_list(self) -> list[dict[str, Any]]:
        served = self.backend.served_model()
        names = self.backend.model_names()
        ordered = ([served] if served else []) + [n for n in names if n != served]
        # "served": not OpenAI's; the one model that answers here comes first and says so.
        return [
            {
                "id": n,
                "object": "model",
                "created": self.created,
                "owned_by": "meshllm",
                "served": n == served,
            }
            for n in ordered
        ]

    async def _models(self, request: Request, respond: Responder) -> None:
        await respond.json(200, {"object": "list", "data": self._model_list()})

    async def _model(self, request: Request, respond: Responder) -> None:
        name = request.path.removeprefix("/v1/models/")
        for entry in self._model_list():
            if entry["id"] == name:
                await respond.json(200, entry)
                return
        raise ApiError(
            404,
            f"The model `{name}` does not exist on this mesh",
            code="model_not_found",
            param="model",
        )

    # -- generation ---------------------------------------------------------------------------
    async def _chat(self, request: Request, respond: Responder) -> None:
        req = schema.parse_chat(schema.parse_body(request.body))
        gen = req.generation
        model, tok = self._ready(gen.model)
        try:
            prompt_ids = tok.encode_messages(req.messages)
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param="messages") from None
        max_tokens = self.max_new_tokens if gen.max_tokens is None else gen.max_tokens
        await self._generate(respond, _Chat(model), tok, prompt_ids, gen, max_tokens)

    async def _completion(self, request: Request, respond: Responder) -> None:
        req = schema.parse_completion(schema.parse_body(request.body))
        gen = req.generation
        model, tok = self._ready(gen.model)
        # A completion continues the text as it is: no chat template.
        prompt_ids = tok.encode_prompt(req.prompt, raw=True)
        assert gen.max_tokens is not None  # completions have a default
        await self._generate(respond, _Completion(model), tok, prompt_ids, gen, gen.max_tokens)

    def _ready(self, requested: str | None) -> tuple[str, Tokenizer]:
        served = self.backend.served_model()
        if requested is not None and served is not None and requested != served:
            raise _not_served(requested, served)
        try:
            ready = self.backend.ready_model()
        except Refused as err:
            raise from_refusal(err) from None
        if requested is not None and requested != ready.name:
            raise _not_served(requested, ready.name)
        return ready.name, ready.tokenizer

    async def _generate(
        self,
        respond: Responder,
        shape: _Shape,
        tok: Tokenizer,
        prompt_ids: list[int],
        gen: schema.Generation,
        max_tokens: int,
    ) -> None:
        out = TextOutput(tok, gen.stop)

        async def on_token(token: int) -> bool:
            delta = out.push(token)
            if gen.stream and delta:
                await self._stream(respond, shape, delta)
            return out.stopped  # a stop sequence ends the query on the mesh too

        try:
            result = await self.backend.generate(
                prompt_ids, max_tokens=max_tokens, sampling=gen.sampling, on_token=on_token
            )
        except Refused as err:
            raise from_refusal(err) from None
        except MeshError as exc:  # deliberate, but not one of query's codes
            raise ApiError(503, str(exc), SERVER, "mesh_error") from None
        rest = out.finish(result.token_ids)
        finish = "stop" if out.stopped or result.finish_reason == "stop" else "length"
        completion = len(result.token_ids)
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        }
        if not gen.stream:
            await respond.json(200, shape.whole(out.text, finish, usage))
            return
        await self._stream(respond, shape, rest)
        await respond.event(_dumps(shape.chunk(None, finish)))
        if gen.include_usage:
            await respond.event(_dumps(shape.usage_chunk(usage)))
        await respond.event("[DONE]")
        await respond.close_events()

    @staticmethod
    async def _stream(respond: Responder, shape: _Shape, text: str) -> None:
        # The stream opens with the first text (or at the end), so that a request that fails
        # before any token still gets a proper status code rather than a broken stream.
        if not respond.started:
            await respond.open_events()
            first = shape.opening()
            if first is not None:
                await respond.event(_dumps(first))
        if text:
            await respond.event(_dumps(shape.chunk(text, None)))


class _Shape:
    """The response objects of one route, for one request."""

    object = ""
    chunk_object = ""
    prefix = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}{secrets.token_hex(12)}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def opening(self) -> dict[str, Any] | None:
        return None

    def chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [self._choice(text, finish)]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": usage}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError


class _Chat(_Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def opening(self) -> dict[str, Any]:
        return {
            **self._head(self.chunk_object),
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {
            **self._head(self.object),
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": usage,
        }


class _Completion(_Shape):
    object = chunk_object = "text_completion"
    prefix = "cmpl-"

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.object), "choices": [self._choice(text, finish)], "usage": usage}


def _not_served(requested: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{requested}` is not served here: this mesh serves "
        f"`{served}` (or leave model out)",
        code="model_not_found",
        param="model",
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
