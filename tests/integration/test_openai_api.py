"""The OpenAI-compatible API of a real mesh, through the official `openai` client.

Three real daemons on loopback serve the real SmolLM2 (int4); one of them, which does not
hold the model, runs the API on a free port (`daemon --api 127.0.0.1:0`). Greedy answers
must be exactly the monolithic model's for the same rendered prompt, streamed or not, with
the right token counts.
"""

from __future__ import annotations

import json

import openai
import pytest

from meshllm import testbed
from meshllm.model.chain import LocalChain
from meshllm.model.generate import generate_ids
from meshllm.model.sampling import SamplingParams
from meshllm.model.tokenizer import ChatTokenizer
from tests.integration.mesh_helpers import cli, status

pytestmark = pytest.mark.real_model

MESSAGES = [
    {"role": "system", "content": "You are a concise geography teacher."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And the capital of Italy?"}]},
]
# The same conversation as the chat template sees it (text parts joined: one here).
RENDERED = [*MESSAGES[:3], {"role": "user", "content": "And the capital of Italy?"}]
PROMPT = "The three primary colours are"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(smollm_models):
    """The monolithic model's greedy answers, in this process: ids, text, finish reason
    and prompt size, for the chat (rendered by the template) and the raw completion."""
    model = smollm_models["int4"]
    tok = ChatTokenizer(model.path)
    chain = LocalChain.load(model, None, threads=1)
    arch = model.manifest.architecture

    def greedy(prompt_ids: list[int]) -> dict:
        ids, finish, *_ = generate_ids(
            chain, arch, prompt_ids, max_tokens=MAX_TOKENS, sampling=SamplingParams()
        )
        return {
            "prompt_tokens": len(prompt_ids),
            "ids": ids,
            "finish": finish,
            "text": tok.decode(ids),
        }

    return {
        "chat": greedy(tok.encode_messages(RENDERED)),
        "completion": greedy(tok.encode_prompt(PROMPT, raw=True)),
    }


@pytest.fixture(scope="module")
def api_mesh(smollm_models, mesh):
    model = smollm_models["int4"]
    with mesh(3) as m:
        m.give_model(model, at=0, restart=False)
        # Peer 1 (which holds no model) restarts with the API on a free port.
        pid = m.restart(1, ("--api", "127.0.0.1:0"))
        # Even split, no balancer: these tests are about the API, not the planner.
        m.serve(model, "--partitioner", "even", "--balance", "none", at=2, timeout=120)
        api = status(m.homes[1])["api"]
        client = openai.OpenAI(base_url=api["url"], api_key="unused", max_retries=0, timeout=120)
        yield {"model": model, "homes": m.homes, "api": api, "client": client, "pid": pid}


def _running(pid: int) -> bool:
    testbed.reap(pid)
    return testbed.is_our_daemon(pid)


def test_the_bound_port_is_reported(api_mesh):
    api = api_mesh["api"]
    assert api["host"] == "127.0.0.1" and api["port"] > 0
    assert api["url"] == f"http://127.0.0.1:{api['port']}/v1"
    assert json.loads(cli(api_mesh["homes"][1], "status", "--json").stdout)["api"] == api
    # The other peers were not asked for it.
    assert status(api_mesh["homes"][0])["api"] is None


def test_models(api_mesh):
    name = api_mesh["model"].name
    models = api_mesh["client"].models.list().data
    assert models[0].id == name and models[0].served is True
    assert models[0].object == "model" and models[0].owned_by == "meshllm"
    assert api_mesh["client"].models.retrieve(name).id == name


def test_chat_completion_equals_the_whole_model(api_mesh, reference):
    ref = reference["chat"]
    out = api_mesh["client"].chat.completions.create(
        model=api_mesh["model"].name, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"] and ref["text"].strip()
    assert choice.finish_reason == ("stop" if ref["finish"] == "stop" else "length")
    assert out.usage.prompt_tokens == ref["prompt_tokens"]
    assert out.usage.completion_tokens == len(ref["ids"])
    assert out.usage.total_tokens == ref["prompt_tokens"] + len(ref["ids"])


def test_streamed_chat_completion_equals_the_whole_model(api_mesh, reference):
    ref = reference["chat"]
    stream = api_mesh["client"].chat.completions.create(
        model=api_mesh["model"].name,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    deltas = [c.choices[0].delta.content or "" for c in chunks[:-1]]
    assert sum(1 for d in deltas if d) > 3  # it really streamed, piece by piece
    assert "".join(deltas) == ref["text"]
    assert chunks[-2].choices[0].finish_reason == ("stop" if ref["finish"] == "stop" else "length")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        ref["prompt_tokens"],
        len(ref["ids"]),
        ref["prompt_tokens"] + len(ref["ids"]),
    )


def test_completion_continues_raw_text(api_mesh, reference):
    ref = reference["completion"]
    out = api_mesh["client"].completions.create(
        model=api_mesh["model"].name, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS
    )
    assert out.object == "text_completion"
    assert out.choices[0].text == ref["text"] and ref["text"].strip()
    assert out.usage.prompt_tokens == ref["prompt_tokens"]
    assert out.usage.completion_tokens == len(ref["ids"])
    # A stop sequence cuts the text before it, and ends generation there.
    cut = api_mesh["client"].completions.create(
        model=api_mesh["model"].name,
        prompt=PROMPT,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stop=[","],
    )
    assert "," in ref["text"]
    assert cut.choices[0].text == ref["text"].split(",")[0]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < len(ref["ids"])


def test_errors_reach_the_client_and_the_daemon_serves_on(api_mesh, reference):
    client, name = api_mesh["client"], api_mesh["model"].name
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10**6)
    assert info.value.status_code == 400
    assert "max_new_tokens" in info.value.message and "1000000" in info.value.message
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.chat.completions.create(model=name, messages=MESSAGES, n=2)
    out = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    assert out.choices[0].message.content == reference["chat"]["text"]
    assert _running(api_mesh["pid"])


def test_a_taken_port_is_a_clear_error(api_mesh, tmp_path):
    home = tmp_path / "other"
    cli(home, "init")
    proc = cli(home, "daemon", "--api", f"127.0.0.1:{api_mesh['api']['port']}", check=False)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{api_mesh['api']['port']}" in proc.stderr
    assert "Traceback" not in proc.stderr
