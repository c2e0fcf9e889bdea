"""Whole buffers of log lines: the bulk flat-JSON pass answers exactly as the line-by-line parser, and is taken
when a buffer allows it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import FileSourceConfig
from exporter.ids import (
    LINE_TOO_LONG,
    NO_ID,
    NOT_JSON,
    LinesParser,
    Sighting,
    flat_json_lines,
    has_longer_line,
    json_parser,
    lines_parser,
    lines_parser_for,
)

LABELS = {"feature": "feature", "team": "owner"}
LIMIT = 400


def line_by_line(labels: dict[str, str] = LABELS, limit: int = LIMIT) -> LinesParser:
    return lines_parser(json_parser("generation_id", labels), limit)


def never(data: bytes) -> list[Sighting | str]:
    raise AssertionError(f"the buffer was parsed line by line: {data[:200]!r}")


def bulk_only(labels: dict[str, str] = LABELS, limit: int = LIMIT) -> LinesParser:
    return flat_json_lines("generation_id", labels, never, limit)


def both(labels: dict[str, str] = LABELS, limit: int = LIMIT) -> LinesParser:
    return flat_json_lines("generation_id", labels, line_by_line(labels, limit), limit)


def lines(*documents: dict[str, object]) -> bytes:
    return b"".join(json.dumps(document).encode() + b"\n" for document in documents)


def test_a_buffer_of_flat_lines_is_taken_in_bulk() -> None:
    data = lines(
        {"ts": "t", "generation_id": "a1", "feature": "chat", "owner": "ml"},
        {"owner": "ml", "feature": "search", "generation_id": "a2", "n": 3},
        {"generation_id": "a3", "owner": "web", "feature": "chat", "ok": True, "x": None},
    )
    assert bulk_only()(data) == [
        Sighting("a1", (("feature", "chat"), ("team", "ml"))),
        Sighting("a2", (("feature", "search"), ("team", "ml"))),
        Sighting("a3", (("feature", "chat"), ("team", "web"))),
    ]


def test_a_label_absent_from_every_line_is_left_out_in_bulk() -> None:
    data = lines({"generation_id": "a1", "feature": "chat"}, {"feature": "chat", "generation_id": "a2"})
    assert bulk_only()(data) == [Sighting("a1", (("feature", "chat"),)), Sighting("a2", (("feature", "chat"),))]
    assert bulk_only({})(data) == [Sighting("a1"), Sighting("a2")]


@pytest.mark.parametrize(
    "odd_line",
    [
        b"",  # blank
        b"   ",
        b'{"generation_id": "a9"}\r',  # CRLF
        b'{"generation_id": "a9", "feature": 7}',  # a number: json decides its text
        b'{"generation_id": "a9", "generation_id": "b9"}',  # repeated key: the last one wins
        b'{"generation_id"generation_id": "a9"}',  # overlapping occurrences
        b'{"msg": "generation_id", "generation_id": "a9"}',
        b'{"generation_id": "a9", "meta": {"feature": "x"}}',  # nesting
        b'{"generation_id": "a\\u0039"}',  # an escape
        '{"generation_id": "a9", "feature": "caf\u00e9"}'.encode(),  # not ASCII
        b'{"generation_id": "not valid!"}',
        b'{"generation_id": 42}',
        b'{"other": "a9"}',
        b"plain text",
        b'{"generation_id": "a9", "pad": "' + b"x" * LIMIT + b'"}',  # over the line limit
        b' {"generation_id": "a9"}',
    ],
)
def test_one_odd_line_sends_the_buffer_line_by_line(odd_line: bytes) -> None:
    data = lines({"generation_id": "a1", "feature": "chat"}) + odd_line + b"\n" + lines({"generation_id": "a2"})
    expected = line_by_line()(data)
    assert both()(data) == expected
    with pytest.raises(AssertionError, match="line by line"):
        bulk_only()(data)


def test_rejections_keep_their_reasons() -> None:
    data = b'plain\n{"other": 1}\n{"generation_id": "a1", "pad": "' + b"x" * LIMIT + b'"}\n'
    assert both()(data) == [NOT_JSON, NO_ID, LINE_TOO_LONG]


def test_dotted_paths_and_other_formats_go_line_by_line() -> None:
    data = b'{"response": {"id": "r1"}}\n'
    config = FileSourceConfig(name="app", path="app.log", id_field="response.id")
    assert lines_parser_for(config)(data) == [Sighting("r1")]
    plain = FileSourceConfig(name="app", path="app.log", format="plain")
    assert lines_parser_for(plain)(b"abc\n\n def \n") == [Sighting("abc"), Sighting("def")]


# Lines built to be flat most of the time, so that whole buffers often qualify for the bulk pass, with every
# kind of near miss mixed in.
ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True) | st.text(max_size=12)
values = st.one_of(
    st.text(alphabet="abc \t:,{}\"\\é", max_size=8),
    st.sampled_from(["chat", "generation_id", '"generation_id"', "feature", "owner"]),
    st.integers(),
    st.booleans(),
    st.none(),
)
keys = st.sampled_from(["generation_id", "feature", "owner", "ts", "msg"])


@st.composite
def flat_line(draw: st.DrawFn) -> bytes:
    document: dict[str, object] = {"generation_id": draw(ids)}
    for key in draw(st.lists(keys, max_size=4)):
        document[key] = draw(values)
    members = list(document.items())
    draw(st.randoms()).shuffle(members)
    separator = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,", " :\t")]))
    text = "{" + separator[0].join(json.dumps(k) + separator[1] + json.dumps(v, ensure_ascii=False)
                                   for k, v in members) + "}"
    return text.encode()


odd_lines = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"", b"  ", b"{}", b'{"generation_id": "a"}\r', b'{"generation_id"generation_id": "a"}',
                     b'{"generation_id": "a", "generation_id": "b"}', b'{"a": {"generation_id": "x"}}']),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buffer=st.lists(st.one_of(flat_line(), flat_line(), flat_line(), odd_lines), min_size=1, max_size=12),
    labels=st.sampled_from([LABELS, {}, {"feature": "feature"}, {"gen": "generation_id"}]),
    limit=st.sampled_from([64, LIMIT, 65536]),
    newline_at_end=st.booleans(),
)
def test_bulk_and_line_by_line_agree(buffer: list[bytes], labels: dict[str, str], limit: int,
                                     newline_at_end: bool) -> None:
    data = b"\n".join(buffer) + (b"\n" if newline_at_end else b"")
    assert both(labels, limit)(data) == line_by_line(labels, limit)(data)


plain_values = st.text(alphabet="abcXYZ019 _-.:,[]", max_size=10)
others = st.dictionaries(st.sampled_from(["ts", "msg", "n"]), st.one_of(plain_values, st.integers(), st.booleans()),
                         max_size=3)


@st.composite
def flat_buffer(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """Buffers that qualify for the bulk pass: every line carries the same keys, in any order and spacing."""
    labels = draw(st.sampled_from([LABELS, {}, {"feature": "feature"}]))
    random = draw(st.randoms())
    out = []
    for _ in range(draw(st.integers(1, 10))):
        document: dict[str, object] = {"generation_id": draw(st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True))}
        document.update({origin: draw(plain_values) for origin in labels.values()})
        document.update(draw(others))
        members = list(document.items())
        random.shuffle(members)
        comma, colon = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,", " :\t")]))
        out.append("{" + comma.join(json.dumps(k) + colon + json.dumps(v) for k, v in members) + "}\n")
    return "".join(out).encode(), labels


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=flat_buffer())
def test_flat_buffers_are_taken_in_bulk_with_the_same_answers(case: tuple[bytes, dict[str, str]]) -> None:
    data, labels = case
    assert bulk_only(labels, 65536)(data) == line_by_line(labels, 65536)(data)


@settings(max_examples=500, deadline=None)
@given(lengths=st.lists(st.integers(0, 100), min_size=1, max_size=12), limit=st.integers(0, 80))
def test_the_long_line_check_agrees_with_measuring_every_line(lengths: list[int], limit: int) -> None:
    text = "\n".join("x" * length for length in lengths)
    assert has_longer_line(text, limit) == (max(lengths) > limit)
