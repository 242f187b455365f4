"""OpenAI request bodies, checked and decoded: every problem is a 400 naming the parameter.

What meshllm cannot honour is refused, never silently ignored: a parameter that would change
the answer (``n > 1``, ``tools``, penalties, ``logprobs``...) is accepted only at the value
that changes nothing. Parameters that do not change the answer (``user``, ``metadata``...)
are accepted and ignored; names OpenAI does not know are refused, as OpenAI does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshllm.api.errors import ApiError
from meshllm.model.sampling import SamplingParams

MAX_STOPS = 4  # as OpenAI

# Accepted and ignored: they do not change what is generated.
_IGNORED = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "parallel_tool_calls",  # meaningful only with tools, which are refused
    }
)

# Accepted only at the value(s) that change nothing; anything else is refused.
_NEUTRAL_COMMON: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}
_NEUTRAL_CHAT: dict[str, tuple[Any, ...]] = {
    **_NEUTRAL_COMMON,
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
_NEUTRAL_COMPLETION: dict[str, tuple[Any, ...]] = {
    **_NEUTRAL_COMMON,
    "logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}

_COMMON = _IGNORED | {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
}
_CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens"} | set(_NEUTRAL_CHAT)
_COMPLETION_KEYS = _COMMON | {"prompt"} | set(_NEUTRAL_COMPLETION)

# The chat template knows these roles; OpenAI's "developer" is its newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_KEYS = frozenset({"role", "content", "name", "refusal", "tool_calls", "function_call"})


@dataclass(frozen=True)
class Generation:
    """What every generating request asks, whatever its route."""

    model: str | None  # None: whichever model is served
    max_tokens: int | None  # None: as many as the peer's limit allows
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # a last stream chunk with the token counts


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]  # {"role", "content"}, roles as the template knows them
    generation: Generation


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    generation: Generation


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    # ValueError: not JSON, not UTF-8, NaN, or an integer of over 4300 digits;
    # RecursionError: nesting deeper than the interpreter's stack allows.
    except (ValueError, RecursionError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return obj


def parse_chat(obj: dict[str, Any]) -> ChatRequest:
    _check_keys(obj, _CHAT_KEYS, _NEUTRAL_CHAT)
    if "messages" not in obj:
        raise _missing("messages")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty array of message objects")
    decoded = tuple(_message(m, i) for i, m in enumerate(messages))
    max_tokens = _optional_int(obj, "max_completion_tokens", 1)
    legacy = _optional_int(obj, "max_tokens", 1)
    if max_tokens is not None and legacy is not None and max_tokens != legacy:
        raise _invalid("max_tokens", "max_tokens and max_completion_tokens differ: give one")
    return ChatRequest(decoded, _generation(obj, max_tokens if max_tokens is not None else legacy))


def parse_completion(obj: dict[str, Any], default_max_tokens: int = 16) -> CompletionRequest:
    """*default_max_tokens*: OpenAI's legacy completions generate 16 tokens unless told."""
    _check_keys(obj, _COMPLETION_KEYS, _NEUTRAL_COMPLETION)
    if "prompt" not in obj:
        raise _missing("prompt")
    prompt = obj["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise _invalid(
            "prompt", "prompt must be a string (batches and token arrays are not supported)"
        )
    if not prompt:
        raise _invalid("prompt", "prompt must not be empty")
    max_tokens = _optional_int(obj, "max_tokens", 1)
    return CompletionRequest(
        prompt, _generation(obj, default_max_tokens if max_tokens is None else max_tokens)
    )


def _generation(obj: dict[str, Any], max_tokens: int | None) -> Generation:
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _invalid("model", "model must be a model name (a non-empty string)")
    # OpenAI's defaults: temperature 1 and top_p 1; temperature 0 is greedy decoding.
    temperature = _optional_number(obj, "temperature", 0.0, 2.0)
    top_p = _optional_number(obj, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise _invalid("top_p", "top_p must be > 0 (for greedy decoding, set temperature 0)")
    top_k = _optional_int(obj, "top_k", 0, 2**31 - 1)  # not OpenAI's: as in vLLM, llama.cpp
    seed = _optional_int(obj, "seed", 0, 2**63 - 1)
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "stream must be true or false")
    include_usage = _stream_options(obj.get("stream_options"), bool(stream))
    return Generation(
        model=model,
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
        ),
        stop=_stops(obj.get("stop")),
        stream=bool(stream),
        include_usage=include_usage,
    )


def _check_keys(
    obj: dict[str, Any], known: frozenset[str], neutral_values: dict[str, tuple[Any, ...]]
) -> None:
    for key, value in obj.items():
        if key not in known:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {key}",
                code="unknown_parameter",
                param=key,
            )
        neutral = neutral_values.get(key)
        if neutral is not None and not any(_same(value, n) for n in neutral):
            raise ApiError(
                400,
                f"{key}={json.dumps(value)[:80]} is not supported by meshllm "
                f"(accepted: {' or '.join(json.dumps(n) for n in neutral)})",
                code="unsupported_parameter",
                param=key,
            )


def _same(value: Any, neutral: Any) -> bool:
    # bool is an int in Python: `true` must not pass for `n: 1`, nor `0` for `false`.
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return bool(value == neutral)


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _invalid(where, f"{where} must be an object with role and content")
    for key in m:
        if key not in _MESSAGE_KEYS:
            raise ApiError(
                400,
                f"Unrecognized argument in {where}: {key}",
                code="unknown_parameter",
                param=f"{where}.{key}",
            )
    role = m.get("role")
    if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
        raise ApiError(
            400,
            f"{where}: tool and function calls are not supported by meshllm",
            code="unsupported_parameter",
            param=f"{where}.role",
        )
    if role not in _ROLES:
        raise _invalid(
            f"{where}.role",
            f"{where}.role must be one of system, developer, user, "
            f"assistant; not {json.dumps(role)[:40]}",
        )
    return {"role": _ROLES[role], "content": _content(m.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    400,
                    f'{where}[{j}]: only text content parts are supported (type "text")',
                    code="unsupported_parameter",
                    param=f"{where}[{j}]",
                )
            if not isinstance(part.get("text"), str):
                raise _invalid(f"{where}[{j}].text", f"{where}[{j}].text must be a string")
            texts.append(part["text"])
        # Parts of one message are lines of one text, as vLLM joins them.
        return "\n".join(texts)
    raise _invalid(where, f"{where} must be a string or an array of text parts")


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise _invalid("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict):
        raise _invalid("stream_options", "stream_options must be an object")
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise ApiError(
                400,
                f"Unrecognized argument in stream_options: {key}",
                code="unknown_parameter",
                param=f"stream_options.{key}",
            )
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _invalid("stream_options.include_usage", "include_usage must be true or false")
    return include


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _invalid(
            "stop",
            f"stop must be a non-empty string or an array of at most {MAX_STOPS} non-empty strings",
        )
    return tuple(stops)


def _optional_int(
    obj: dict[str, Any], key: str, minimum: int, maximum: int | None = None
) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _invalid(key, f"{key} must be an integer {bounds}")
    return value


def _optional_number(obj: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(key, f"{key} must be a number between {low:g} and {high:g}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _invalid(key, f"{key} must be between {low:g} and {high:g}, not {value}")
    return float(value)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _missing(param: str) -> ApiError:
    return ApiError(
        400,
        f"Missing required parameter: '{param}'",
        code="missing_required_parameter",
        param=param,
    )
