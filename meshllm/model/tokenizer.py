"""Tokenizer and chat template of an imported model (tokenizers + a sandboxed Jinja template)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError

# tokenizers and jinja2 (about 14 MiB together) are imported when a model's tokenizer is first
# loaded: only a peer that coordinates queries needs them.


class ChatTemplateError(MeshError):
    """A message list the model's chat template cannot render (or a model without one)."""


def _raise_exception(message: str) -> None:
    # Hugging Face chat templates reject what they cannot render (roles out of order, say)
    # by calling this; the caller learns the template's own reason.
    from jinja2 import TemplateError

    raise TemplateError(message)


class ChatTokenizer:
    def __init__(self, model_dir: Path):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        template = None
        tpl_file = model_dir / "chat_template.jinja"
        if tpl_file.is_file():
            template = tpl_file.read_text()
        cfg_file = model_dir / "tokenizer_config.json"
        self._special: dict[str, str] = {}
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            template = template or cfg.get("chat_template")
            for key in ("bos_token", "eos_token"):
                if isinstance(cfg.get(key), str):
                    self._special[key] = cfg[key]
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        self._template: Any = env.from_string(template) if template else None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, prompt: str) -> str:
        """One user prompt in the chat template (the prompt as is, for a model without one)."""
        if self._template is None:
            return prompt
        return self.render_messages([{"role": "user", "content": prompt}])

    def render_messages(self, messages: Sequence[Mapping[str, str]]) -> str:
        """A conversation ({"role", "content"} dicts, in order) in the chat template, ending
        where the assistant's next turn starts."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template: send raw text instead")
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=True, **self._special
            )
        except TemplateError as exc:
            raise ChatTemplateError(
                f"the model's chat template cannot render this: {exc}"
            ) from None

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        # The template already holds every special token the model expects.
        return self.tokenizer.encode(self.render_messages(messages), add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, *, raw: bool = False) -> list[int]:
        if raw or self._template is None:
            return self.tokenizer.encode(prompt, add_special_tokens=True).ids
        return self.encode_messages([{"role": "user", "content": prompt}])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a growing list of token ids into text increments, never splitting a character.

    Decodes only a short window per token (the tokens since the last emitted text, with the
    ones before them as context), so streaming costs the same at token 10 and token 5000.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet, or an incomplete UTF-8 sequence
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
