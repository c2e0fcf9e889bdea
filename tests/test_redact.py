"""Redaction of the key from echoed text: whole, cut, or any piece of 8 characters or more."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exporter.redact import MIN_PIECE, REDACTED, Redactor

KEY = "sk-mg-v1-" + "0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2
SECRET = KEY[len("sk-mg-v1-"):]
redact = Redactor([KEY])


def pieces(text: str) -> list[str]:
    return [SECRET[i: i + MIN_PIECE] for i in range(len(SECRET) - MIN_PIECE + 1) if SECRET[i: i + MIN_PIECE] in text]


@given(before=st.text(max_size=40), after=st.text(max_size=40), start=st.integers(0, len(KEY) - MIN_PIECE),
       length=st.integers(MIN_PIECE, len(KEY)))
def test_any_piece_of_the_key_is_redacted(before: str, after: str, start: int, length: int) -> None:
    piece = KEY[start: start + length]
    out = redact(before + piece + after)
    assert not pieces(out)
    if start + len(piece) > len(KEY) - len(SECRET):  # not only the public kind prefix (sk-mg-v1-)
        assert REDACTED in out


def test_what_is_not_the_key_is_left_alone() -> None:
    for text in ("key kind sk-mg-v1- (management)", SECRET[:MIN_PIECE - 1], "request 7a2c-11f0", ""):
        assert redact(text) == text
    assert redact(f"Bearer {KEY}.") == f"Bearer {REDACTED}."
    assert redact(f"cut: {KEY[:40]}") == f"cut: sk{REDACTED}"
