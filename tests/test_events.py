"""perc.events: typed events survive the JSON log format and come back as the same class."""

from __future__ import annotations

import io
import json
import logging
import uuid

import attrs
import pytest

from perc import events, logsetup


@events.register
@attrs.frozen
class _Probe(events.Event):
    kind = "test_probe"
    association: uuid.UUID
    count: int
    blob: bytes = b""
    name: str | None = None


def _log_through(fmt: str, event: events.Event) -> str:
    stream = io.StringIO()
    logsetup.setup("debug", stream, fmt=fmt)
    try:
        events.emit(logging.getLogger("perc.test"), event)
    finally:
        logsetup.setup("info")
    return stream.getvalue()


def test_json_line_round_trips_to_the_same_event() -> None:
    probe = _Probe(uuid.uuid4(), 7, b"\x01\x02", "alice")
    line = _log_through("json", probe)
    obj = json.loads(line)
    assert obj["event"] == "test_probe"
    assert obj["data"]["count"] == 7
    assert obj["level"] == "INFO"
    assert events.parse_line(line) == probe


def test_human_line_is_the_description_and_parses_to_nothing() -> None:
    probe = _Probe(uuid.UUID(int=1), 3)
    line = _log_through("human", probe)
    assert "test probe association=00000000-0000-0000-0000-000000000001 count=3" in line
    assert events.parse_line(line) is None


def test_plain_records_and_junk_are_not_events() -> None:
    stream = io.StringIO()
    logsetup.setup("info", stream, fmt="json")
    try:
        logging.getLogger("perc.test").info("hello %s", "world")
    finally:
        logsetup.setup("info")
    line = stream.getvalue()
    assert json.loads(line)["msg"] == "hello world"
    assert events.parse_line(line) is None
    for junk in ("", "{", "[1]", '{"a": 1}', "not json"):
        assert events.parse_line(junk) is None


def test_bad_event_lines_raise_the_one_error() -> None:
    with pytest.raises(events.EventError):
        events.parse_line('{"event": "no_such_kind", "data": {}}')
    with pytest.raises(events.EventError):
        events.parse_line('{"event": "test_probe", "data": {"count": "x"}}')


def test_kinds_are_unique() -> None:
    @attrs.frozen
    class Twin(events.Event):
        kind = "test_probe"

    with pytest.raises(TypeError):
        events.register(Twin)


def test_log_format_option_is_checked() -> None:
    with pytest.raises(ValueError, match="log format"):
        logsetup.setup("info", fmt="xml")
