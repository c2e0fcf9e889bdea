"""What a valid generation id is, and the pure parsers that find ids (and labels) in lines and datagrams."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from exporter.config import FileSourceConfig, SourceConfig, UdpSourceConfig

# What ZenMux ids look like (see the API reference); zenmux_emit.emit.ID_PATTERN, the app-side copy, must equal it.
ID_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"
VALID_ID = re.compile(ID_PATTERN)

# Rejection reasons: the `reason` label of zenmux_exporter_ids_rejected_total.
INVALID_ID = "invalid_id"
NO_ID = "no_id"
NOT_JSON = "not_json"
LINE_TOO_LONG = "line_too_long"
DATAGRAM_TOO_LARGE = "datagram_too_large"
QUEUE_FULL = "queue_full"
FILE_REJECT_REASONS = (NOT_JSON, NO_ID, INVALID_ID, LINE_TOO_LONG, QUEUE_FULL)
UDP_REJECT_REASONS = (NOT_JSON, NO_ID, INVALID_ID, DATAGRAM_TOO_LARGE, QUEUE_FULL)

Labels = tuple[tuple[str, str], ...]


def is_valid_id(candidate: str) -> bool:
    return VALID_ID.fullmatch(candidate) is not None


class Sighting(NamedTuple):
    """A generation id seen by a source, with the extra label values found beside it.

    A named tuple rather than a dataclass: one is made per line read, and a tuple is the cheapest to build.
    """

    id: str
    labels: Labels = ()


# `Sighting(a, b)` runs a generated Python `__new__`; this is the same tuple without that frame (hot path).
new_sighting = tuple.__new__

# A parser turns one line (without its newline) into a Sighting or a rejection reason.
LineParser = Callable[[bytes], Sighting | str]
# A lines parser turns a buffer of whole lines into one result per non-blank line, in order.
LinesParser = Callable[[bytes], list[Sighting | str]]


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _dig(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def _member_pattern(key: str) -> re.Pattern[bytes]:
    """`"key": value` inside a line; group 1 is a string value's text, group 2 any other value's first token."""
    return re.compile(rb'"' + re.escape(key.encode()) + rb'"[ \t]*:[ \t]*(?:"([^"]*)"|([^ \t,}\]]*))')


def json_parser(id_field: str, labels: dict[str, str]) -> LineParser:
    """Lines are JSON objects; the id (and each label) sits at a dotted path.

    The hot path never builds a document: for a flat object (one `{`, no backslash, ASCII) whose fields are
    plain strings, the id and the labels are read with one compiled pattern each. In such a line a quoted
    key followed by `:` can only be a key of the top-level object, so the result equals `json.loads`' for
    every valid line. Anything else -- nesting, escapes, non-ASCII, a missing or repeated field, a value
    that is not a string -- goes through `json.loads`, so rejections keep their exact reasons.
    """
    id_path = tuple(id_field.split("."))
    label_paths = [(name, tuple(origin.split("."))) for name, origin in sorted(labels.items())]
    fast = len(id_path) == 1 and all(len(path) == 1 for _, path in label_paths)
    id_key = f'"{id_path[0]}"'.encode()
    id_member = _member_pattern(id_path[0])
    label_members = [(name, f'"{path[0]}"'.encode(), _member_pattern(path[0])) for name, path in label_paths]
    valid_id = VALID_ID.fullmatch

    def parse_document(line: bytes) -> Sighting | str:
        try:
            document = json.loads(line)
        except (ValueError, RecursionError):
            return NOT_JSON
        if not isinstance(document, dict):
            return NOT_JSON
        value = _dig(document, id_path)
        if value is None:
            return NO_ID
        if not isinstance(value, str) or not is_valid_id(value):
            return INVALID_ID
        found = tuple(
            (name, text) for name, path in label_paths if (text := _label_text(_dig(document, path))) is not None
        )
        return Sighting(value, found)

    def parse(line: bytes) -> Sighting | str:
        # A key found once (no second occurrence, overlapping or not) is matched where it is, not searched.
        at = line.find(id_key)
        if not (
            fast
            and at >= 0
            and line.startswith(b"{")
            and line.endswith(b"}")
            and line.count(b"{") == 1
            and b"\\" not in line
            and line.isascii()
            and line.find(id_key, at + 1) < 0
        ):
            return parse_document(line)
        match = id_member.match(line, at)
        if match is None or match.group(1) is None:
            return parse_document(line)  # not a string: let json decide between no_id and invalid_id
        value = match.group(1).decode()
        if valid_id(value) is None:
            return parse_document(line)  # a rejection: let json decide which one, exactly
        if not label_members:
            return new_sighting(Sighting, (value, ()))
        found: list[tuple[str, str]] = []
        for name, key, member in label_members:
            at = line.find(key)
            if at < 0:
                continue
            hit = member.match(line, at) if line.find(key, at + 1) < 0 else None
            if hit is None or hit.group(1) is None:
                return parse_document(line)  # a number, a literal, a repeated key: json.loads' rules
            found.append((name, hit.group(1).decode()))
        return new_sighting(Sighting, (value, tuple(found)))

    return parse


def regex_parser(pattern: str, labels: dict[str, str]) -> LineParser:
    """Lines match a regular expression with a named group `id` (and groups for labels)."""
    compiled = re.compile(pattern)
    label_groups = sorted(labels.items())

    def parse(line: bytes) -> Sighting | str:
        text = line.decode("utf-8", "replace")
        match = compiled.search(text)
        if match is None or match.group("id") is None:
            return NO_ID
        value = match.group("id")
        if not is_valid_id(value):
            return INVALID_ID
        found = tuple((name, v) for name, group in label_groups if (v := match.group(group)) is not None)
        return Sighting(value, found)

    return parse


def plain_parser() -> LineParser:
    """The whole line, stripped, is the id."""

    def parse(line: bytes) -> Sighting | str:
        value = line.strip().decode("utf-8", "replace")
        if not value:
            return NO_ID
        if not is_valid_id(value):
            return INVALID_ID
        return Sighting(value)

    return parse


def parser_for(source: SourceConfig) -> LineParser:
    if source.format == "json":
        return json_parser(source.id_field, dict(source.labels))
    if source.format == "regex":
        return regex_parser(source.pattern, dict(source.labels))
    return plain_parser()


def lines_parser(parse: LineParser, max_line_bytes: int) -> LinesParser:
    """Line by line: blank lines skipped, CRLF tolerated, a line over `max_line_bytes` rejected whole."""

    def parse_lines(data: bytes) -> list[Sighting | str]:
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        # Blank lines are skipped; `line and not line.isspace()` is `line.strip()` without the copy.
        return [
            LINE_TOO_LONG if len(line) > max_line_bytes else parse(line.rstrip(b"\r"))
            for line in lines
            if len(line) > max_line_bytes or (line and not line.isspace())
        ]

    return parse_lines


def _member_to_line_end(key: str, value: str) -> re.Pattern[str]:
    """`"key": value` and the rest of its line: one match per line at most, so matches count lines.

    It starts with the quoted key, a literal, so the regex engine searches for it at C speed.
    """
    return re.compile(re.escape(f'"{key}"') + r"[ \t]*:[ \t]*" + value + r"[^\n]*\n")


BULK_KEY = re.compile(r"[A-Za-z0-9_-]+")


def has_longer_line(text: str, limit: int) -> bool:
    """Whether a line of `text` (without its newline) is longer than `limit` characters.

    Measuring every line (a split of the whole buffer) cost ~5 % of file ingest. A line over `limit` covers
    a whole aligned block of `limit // 2` characters, so when each such block holds a newline (a few fast
    searches per megabyte) no line is that long; only a buffer with a block without newline is measured.
    """
    block = max(limit // 2, 1)
    for start in range(0, len(text) - block + 1, block):
        if text.find("\n", start, start + block) < 0:
            return max(map(len, text.split("\n"))) > limit
    return False


def flat_json_lines(id_field: str, labels: dict[str, str], line_by_line: LinesParser, max_line_bytes: int) -> (
        LinesParser):
    """Whole buffers of flat JSON lines, with a handful of C-level passes instead of a dozen calls per line.

    A buffer is taken in bulk when every line is `{...}` with no other `{`, it is ASCII without a backslash,
    no line is over `max_line_bytes`, and each key (id, labels) occurs exactly once on every line as a member
    with a plain string value (a label may also be absent from every line). Those are the conditions under
    which `json_parser`'s per-line fast path answers, so the results are the same; any other buffer -- one
    odd line is enough -- is parsed line by line.
    """
    if not all(BULK_KEY.fullmatch(key) for key in (id_field, *labels.values())):
        return line_by_line
    id_key = f'"{id_field}"'
    id_member = _member_to_line_end(id_field, f'"({ID_PATTERN})"')
    members = [(name, f'"{origin}"', _member_to_line_end(origin, r'"([^"\n]*)"'))
               for name, origin in sorted(labels.items())]
    # `"k"k"` holds two overlapping occurrences of `"k"`; count() sees one, and the second could match.
    overlaps = [f'"{key}"{key}"' for key in (id_field, *labels.values())]

    def bulk(data: bytes) -> list[Sighting | str] | None:
        if not (data.startswith(b"{") and data.endswith(b"}\n") and data.isascii() and b"\\" not in data):
            return None
        text = data.decode("ascii")
        lines = text.count("\n")
        # Every line is `{...}` with one `{`, and holds the id key once (findall below proves "at least once").
        if not (
            text.count("}\n{") == lines - 1
            and text.count("{") == lines
            and text.count(id_key) == lines
            and not any(overlap in text for overlap in overlaps)
        ):
            return None
        # Every count before any findall: a buffer that goes line by line should cost little more than that.
        counted = [(name, member, text.count(key)) for name, key, member in members]
        if any(count not in (0, lines) for _, _, count in counted):
            return None  # a label on some lines only, or more often than once a line
        present = [(name, member) for name, member, count in counted if count]
        if len(text) > max_line_bytes and has_longer_line(text, max_line_bytes):
            return None
        ids = id_member.findall(text)
        if len(ids) != lines:
            return None
        columns: list[list[tuple[str, str]]] = []
        for name, member in present:
            values = member.findall(text)
            if len(values) != lines:
                return None
            # One tuple per distinct value, shared by its lines (and by the label encoding cache downstream).
            pairs = {value: (name, value) for value in set(values)}
            columns.append([pairs[value] for value in values])
        if not columns:
            return [new_sighting(Sighting, (generation_id, ())) for generation_id in ids]
        return [
            new_sighting(Sighting, (generation_id, found))
            for generation_id, found in zip(ids, zip(*columns, strict=True), strict=True)
        ]

    def parse_lines(data: bytes) -> list[Sighting | str]:
        parsed = bulk(data)
        return line_by_line(data) if parsed is None else parsed

    return parse_lines


# Whole lines, each a valid id and nothing else: what a buffer of plain ids looks like (one pass of the regex
# engine; an id holds no newline, so it never backtracks).
PLAIN_LINES = re.compile(rb"(?:" + ID_PATTERN.encode() + rb"\n)+")


def plain_lines(line_by_line: LinesParser) -> LinesParser:
    """Whole buffers of plain ids in one C-level pass when every line is a bare valid id (no blank line, no
    whitespace, no CR): then each line is its own id, as `plain_parser` says; any other buffer line by line."""

    def parse_lines(data: bytes) -> list[Sighting | str]:
        if PLAIN_LINES.fullmatch(data) is None:
            return line_by_line(data)
        ids = data.decode("ascii").split("\n")
        ids.pop()  # the empty string after the last newline
        return [new_sighting(Sighting, (generation_id, ())) for generation_id in ids]

    return parse_lines


def bulk_lines_parser(source: SourceConfig, max_line_bytes: int) -> LinesParser:
    """Buffers of whole lines: flat JSON and plain ids in bulk where they can, any format line by line."""
    line_by_line = lines_parser(parser_for(source), max_line_bytes)
    flat = source.format == "json" and "." not in source.id_field and not any("." in o for o in source.labels.values())
    if flat:
        return flat_json_lines(source.id_field, dict(source.labels), line_by_line, max_line_bytes)
    if source.format == "plain":
        return plain_lines(line_by_line)
    return line_by_line


def lines_parser_for(source: FileSourceConfig) -> LinesParser:
    """How a file source parses what it reads."""
    return bulk_lines_parser(source, source.max_line_bytes)


def datagrams_parser_for(source: UdpSourceConfig) -> LinesParser:
    """How a UDP source parses datagrams (each within max_datagram_bytes), one or many joined by newlines: a
    datagram is a buffer of lines (the last one may lack its newline), so no line is over the datagram limit."""
    return bulk_lines_parser(source, source.max_datagram_bytes)


def split_lines(data: bytes) -> Iterator[bytes]:
    """Non-blank lines of a datagram or a buffer, CRLF tolerated."""
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.strip():
            yield line


def parse_datagram(data: bytes, parse: LineParser, max_bytes: int) -> list[Sighting | str]:
    """Every id in one datagram (one per line), or a single rejection for an oversized datagram."""
    if len(data) > max_bytes:
        return [DATAGRAM_TOO_LARGE]
    return [parse(line) for line in split_lines(data)]
