"""Progress reporting and cancellation: the JSON-lines protocol the Slicer modules read."""

from __future__ import annotations

import io

import pytest

from ContrastAmplifierCommon.progress import (
    CancelToken,
    Cancelled,
    JsonLinesProgress,
    SubProgress,
    check_cancel,
    make_progress,
    null_progress,
    parse_json_progress_line,
)


def test_sub_progress_maps_and_clamps_into_the_parent_span():
    seen = []
    sub = SubProgress(lambda stage, fraction, message="": seen.append((stage, round(fraction, 6), message)), 0.4, 0.9)
    for fraction in (-1.0, 0.0, 0.5, 1.0, 2.0):
        sub("ensemble", fraction, "x")
    assert [f for _, f, _ in seen] == [0.4, 0.4, 0.65, 0.9, 0.9]
    nested = SubProgress(sub, 0.5, 1.0)  # a sub-job of a sub-job
    nested("write", 0.5)
    assert seen[-1][1] == pytest.approx(0.4 + 0.5 * (0.5 + 0.5 * 0.5))


def test_json_lines_round_trip_and_foreign_lines_are_ignored():
    stream = io.StringIO()
    report = JsonLinesProgress(stream)
    report("register", 0.123456, "rigid flair -> T1c")
    report("warning", 0.5, 'quotes " and unicode é')
    lines = stream.getvalue().splitlines()
    assert [parse_json_progress_line(line) for line in lines] == [
        {"stage": "register", "fraction": 0.1235, "message": "rigid flair -> T1c"},
        {"stage": "warning", "fraction": 0.5, "message": 'quotes " and unicode é'},
    ]
    for foreign in ("", "HD-BET: (160, 192, 160)", "{not json", '{"stage": "x"}', "[1, 2]"):
        assert parse_json_progress_line(foreign) is None


def test_cancel_token_and_reporter_kinds():
    token = CancelToken()
    check_cancel(token)
    check_cancel(None)
    token.cancel()
    assert token.cancelled
    with pytest.raises(Cancelled):
        check_cancel(token)
    assert make_progress("none") is null_progress
    assert isinstance(make_progress("json"), JsonLinesProgress)
    with pytest.raises(ValueError, match="--progress must be one of bar, json, none"):
        make_progress("fancy")
