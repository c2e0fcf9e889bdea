"""Redaction of the API key from anything an API or a peer may echo back: whole, cut, or any piece of it."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A piece of the key this long is the key (a cut error message, a truncated header): 8 characters of a
# random key are ~48 bits, never a coincidence in an error message or a request id.
MIN_PIECE = 8
REDACTED = "<redacted>"
# The kind prefix (sk-ai-v1-) is printed on purpose (key_kind) and is no secret.
_PUBLIC_PREFIX = re.compile(r"sk-[a-z]{2}-v\d+-")


class Redactor:
    """Replaces every run of text covered by pieces (>= MIN_PIECE characters) of the secrets with REDACTED."""

    def __init__(self, secrets: Iterable[str]) -> None:
        pieces: set[str] = set()
        self._whole = sorted({s for s in secrets if s}, key=len, reverse=True)
        # Any MIN_PIECE-long piece holds one of these 4-character blocks (the ones starting at multiples of 4):
        # `in` on each is a fast first test that nearly every text fails, before the regex (~5-10 us) runs.
        self._blocks = {secret[i: i + 4] for secret in self._whole for i in range(0, max(len(secret) - 3, 1), 4)}
        for secret in self._whole:
            public = _PUBLIC_PREFIX.match(secret)
            skip = public.end() if public else 0
            if len(secret) < MIN_PIECE:
                if secret:
                    pieces.add(secret)
                continue
            for start in range(len(secret) - MIN_PIECE + 1):
                if start + MIN_PIECE > skip:  # a piece wholly inside the public prefix is not secret
                    pieces.add(secret[start: start + MIN_PIECE])
        # One pass of the regex engine finds every position a piece starts at (the lookahead lets them overlap).
        alternatives = "|".join(re.escape(piece) for piece in sorted(pieces, key=len, reverse=True))
        self._pattern = re.compile(f"(?=({alternatives}))") if pieces else None

    def __call__(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not self.found_in(text):
            return text
        for secret in self._whole:  # the whole key first: its public prefix goes too
            text = text.replace(secret, REDACTED)
        covered: list[tuple[int, int]] = []
        for match in pattern.finditer(text):
            start, end = match.start(), match.start() + len(match.group(1))
            if covered and start <= covered[-1][1]:
                covered[-1] = (covered[-1][0], max(end, covered[-1][1]))
            else:
                covered.append((start, end))
        parts, last = [], 0
        for start, end in covered:
            parts += [text[last:start], REDACTED]
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def found_in(self, text: str) -> bool:
        return (
            self._pattern is not None
            and any(block in text for block in self._blocks)
            and self._pattern.search(text) is not None
        )
