"""Tokens to the text an API client sees, with stop sequences (on the tiny model's real
byte-level tokenizer, where one character can take several tokens)."""

from __future__ import annotations

import pytest

from meshllm.api.text import TextOutput
from meshllm.model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_source) -> ChatTokenizer:
    return ChatTokenizer(tiny_source)


def feed(out: TextOutput, ids: list[int]) -> tuple[list[str], list[int]]:
    """Push tokens until the output says stop; (pieces given out, tokens used)."""
    pieces, used = [], []
    for t in ids:
        used.append(t)
        pieces.append(out.push(t))
        if out.stopped:
            break
    pieces.append(out.finish(used))
    return pieces, used


TEXT = "Bonjour, ça va? Très bien — merci. 東京 is far."


def test_without_stops_the_pieces_are_the_whole_decode(tok):
    ids = tok.tokenizer.encode(TEXT, add_special_tokens=False).ids
    out = TextOutput(tok)
    pieces, _ = feed(out, ids)
    assert "".join(pieces) == out.text == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (["merci"], "Bonjour, ça va? Très bien — "),
        (["ça", "Très"], "Bonjour, "),
        (["東京"], "Bonjour, ça va? Très bien — merci. "),
        (["."], "Bonjour, ça va? Très bien — merci"),
        (["nowhere"], TEXT),
        (["far.!"], TEXT),  # a stop that only begins at the very end: held, then given out
    ],
)
def test_stop_sequences_cut_before_the_match(tok, stops, expected):
    ids = tok.tokenizer.encode(TEXT, add_special_tokens=False).ids
    out = TextOutput(tok, stops)
    pieces, used = feed(out, ids)
    assert "".join(pieces) == out.text == expected
    assert out.stopped == (expected != TEXT)
    if out.stopped:
        # Generation ends at the token that completed the match, not later.
        assert any(s in tok.decode(used) for s in stops)
        assert not any(s in tok.decode(used[:-1]) for s in stops)
