"""The chat template renders whole conversations; a single prompt still gives the same ids."""

from __future__ import annotations

import shutil

import pytest

from meshllm.model.tokenizer import ChatTemplateError, ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_source) -> ChatTokenizer:
    return ChatTokenizer(tiny_source)


def test_single_prompt_ids_are_unchanged(tok):
    # What encode_prompt has always given: the prompt as one user turn of the template.
    rendered = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    expected = tok.tokenizer.encode(rendered, add_special_tokens=False).ids
    assert tok.encode_prompt("Why is the sky blue?") == expected
    assert tok.encode_messages([{"role": "user", "content": "Why is the sky blue?"}]) == expected
    assert tok.render_chat("Why is the sky blue?") == rendered


def test_a_conversation_renders_every_turn_in_order(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_messages(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode_messages(messages)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == tok.render_messages(messages)


def test_template_refusals_and_missing_templates_are_clear_errors(tmp_path, tiny_source):
    shutil.copy(tiny_source / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
        "{% endif %}{{ messages[0]['content'] }}{{ ''.__class__.__mro__ }}"
    )
    strict = ChatTokenizer(tmp_path)
    with pytest.raises(ChatTemplateError, match="must start with user"):
        strict.render_messages([{"role": "system", "content": "x"}])
    # The sandbox refuses what a hostile template tries.
    with pytest.raises(ChatTemplateError, match="cannot render"):
        strict.render_messages([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").unlink()
    plain = ChatTokenizer(tmp_path)
    assert not plain.has_chat_template
    assert plain.render_chat("as is") == "as is"
    with pytest.raises(ChatTemplateError, match="no chat template"):
        plain.encode_messages([{"role": "user", "content": "x"}])
