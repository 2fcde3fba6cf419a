"""What people type: task arguments from the command line, a file or stdin; times and spans."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest

from service.cli import payload
from service.cli.payload import BadInput

NOW = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


def test_positional_arguments_are_json_when_they_parse() -> None:
    args, kwargs = payload.task_arguments(["2", "x", '{"a": 1}'], None, None)
    assert args == [2, "x", {"a": 1}]
    assert kwargs == {}


def test_kwargs_keep_every_key_even_option_names() -> None:
    text = '{"queue": "q", "countdown": 30, "priority": 3}'
    _, kwargs = payload.task_arguments([], None, text)
    assert kwargs == {"queue": "q", "countdown": 30, "priority": 3}


def test_args_and_kwargs_from_files(tmp_path: Path) -> None:
    (tmp_path / "args.json").write_text(json.dumps([1, "two", [3]]))
    (tmp_path / "kwargs.json").write_text(json.dumps({"big": "x" * 100_000}))
    args, kwargs = payload.task_arguments([], f"@{tmp_path / 'args.json'}", f"@{tmp_path / 'kwargs.json'}")
    assert args == [1, "two", [3]]
    assert len(kwargs["big"]) == 100_000


def test_args_from_stdin() -> None:
    args, kwargs = payload.task_arguments([], "-", '{"k": true}', stdin=io.StringIO("[4, 5]"))
    assert (args, kwargs) == ([4, 5], {"k": True})


@pytest.mark.parametrize(
    ("positional", "args_text", "kwargs_text", "message"),
    [
        (["1"], "[2]", None, "not both"),
        ([], "-", "-", "only one of --args and --kwargs"),
        ([], '{"a": 1}', None, "--args must be a JSON array"),
        ([], None, "[1]", "--kwargs must be a JSON object"),
        ([], None, "{nope", "--kwargs is not JSON"),
        ([], "@/no/such/file.json", None, "--args: cannot read /no/such/file.json"),
    ],
)
def test_unusable_arguments_say_which_option(
    positional: list[str], args_text: str | None, kwargs_text: str | None, message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        payload.task_arguments(positional, args_text, kwargs_text, stdin=io.StringIO("[]"))


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("+30", 30), ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400)]
)
def test_spans(text: str, seconds: float) -> None:
    assert payload.seconds("--expires", text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5", "inf", "nan", ""])
def test_unusable_spans(text: str) -> None:
    with pytest.raises(BadInput, match="--expires"):
        payload.seconds("--expires", text)


def test_relative_times_count_from_now() -> None:
    assert payload.point_in_time("--at", "+90", now=NOW).moment == NOW + dt.timedelta(seconds=90)
    assert payload.point_in_time("--at", "+2h", now=NOW).moment == NOW + dt.timedelta(hours=2)


def test_times_with_a_zone_are_taken_as_given() -> None:
    when = payload.point_in_time("--at", "2030-06-01T09:00:00+02:00", now=NOW)
    assert when.moment == dt.datetime(2030, 6, 1, 7, 0, tzinfo=dt.UTC)
    assert when.note == ""
    assert payload.point_in_time("--at", "2030-06-01T09:00:00Z", now=NOW).moment.utcoffset() == dt.timedelta(
        0
    )


def test_naive_times_are_local_and_say_so() -> None:
    when = payload.point_in_time("--at", "2030-06-01T09:00", now=NOW)
    assert when.moment == dt.datetime(2030, 6, 1, 9, 0).astimezone()
    assert "local time" in when.note
    assert "UTC" in when.note


def test_expiry_takes_seconds_or_a_time() -> None:
    assert payload.expiry("300", now=NOW).moment == NOW + dt.timedelta(seconds=300)
    assert payload.expiry("5m", now=NOW).moment == NOW + dt.timedelta(minutes=5)
    assert payload.expiry("2030-05-02T00:00:00Z", now=NOW).moment == dt.datetime(2030, 5, 2, tzinfo=dt.UTC)


def test_unusable_time_shows_an_example() -> None:
    with pytest.raises(BadInput, match=r"--at: 'tomorrow' is neither \+SECONDS nor a time like 2030-05-02"):
        payload.point_in_time("--at", "tomorrow", now=NOW)


def test_help_example_is_tomorrow() -> None:
    example = dt.datetime.fromisoformat(payload.example_time())
    assert dt.timedelta(0) < example - dt.datetime.now(dt.UTC) < dt.timedelta(days=2)
