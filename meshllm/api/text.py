"""Generated tokens as the text a client sees: increments that never split a character,
ending just before the first stop sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshllm.model.tokenizer import TextStream


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextOutput:
    """Feed it tokens with :meth:`push`, then call :meth:`finish` once generation ends.

    With stop sequences, text that could be the start of one is held back until the next
    tokens show whether it is: a client never sees any part of a stop sequence.
    """

    def __init__(self, tokenizer: Decoder, stops: Sequence[str] = ()):
        self._tok = tokenizer
        self._stream = TextStream(tokenizer)  # type: ignore[arg-type]
        self._stops = tuple(stops)
        self._held = ""
        self.text = ""  # everything given out so far
        self.stopped = False  # a stop sequence was found: generation should end

    def push(self, token: int) -> str:
        """The text *token* adds (often "", while a character or a stop match is incomplete)."""
        if self.stopped:
            return ""
        return self._give(self._stream.push(token))

    def finish(self, token_ids: list[int]) -> str:
        """The rest, once the last token is in: what decoding all of *token_ids* adds to what
        the stream gave (a character left incomplete at the very end), and any held text."""
        if self.stopped:
            return ""
        whole = self._tok.decode(token_ids)
        streamed = self._stream.text
        out = self._give(whole[len(streamed) :] if whole.startswith(streamed) else "")
        if not self.stopped:
            out += self._held
            self.text += self._held
            self._held = ""
        return out

    def _give(self, delta: str) -> str:
        if not self._stops:
            self.text += delta
            return delta
        pending = self._held + delta
        cuts = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self._held = pending[: min(cuts)], ""
        else:
            keep = _longest_stop_prefix(pending, self._stops)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of *text* that begins some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
