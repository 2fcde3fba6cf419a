"""The ``taskgate`` argument parser: global --target, enqueue's options, its help."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from service.cli.main import build_parser
from service.cli.tasks import DEFAULT_TARGET


@pytest.fixture(autouse=True)
def _no_target_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKGATE_TARGET", raising=False)


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["status", "t1"], DEFAULT_TARGET),
        (["--target", "h:1", "status", "t1"], "h:1"),
        (["status", "t1", "--target", "h:2"], "h:2"),
        (["--target", "h:1", "status", "--target", "h:2", "t1"], "h:2"),
        (["--target", "h:1", "watch", "t1"], "h:1"),
        (["--target", "h:1", "enqueue", "demo.add", "1", "2"], "h:1"),
    ],
)
def test_target_before_or_after_the_command(argv: list[str], target: str) -> None:
    assert build_parser().parse_args(argv).target == target


def test_target_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKGATE_TARGET", "env:9")
    assert build_parser().parse_args(["status", "t1"]).target == "env:9"
    assert build_parser().parse_args(["status", "t1", "--target", "h:2"]).target == "h:2"


def test_enqueue_options() -> None:
    args = build_parser().parse_args(
        ["enqueue", "demo.add", "1", "2", "--queue", "q", "--priority", "3", "--countdown", "30",
         "--expires", "5m", "--request-id", "r1", "--kwargs", "{}"]
    )  # fmt: skip
    assert (args.name, args.args, args.queue, args.priority, args.countdown) == (
        "demo.add",
        ["1", "2"],
        "q",
        3,
        30,
    )
    assert (args.expires, args.request_id, args.kwargs, args.args_json) == ("5m", "r1", "{}", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["enqueue", "demo.add", "--priority", "10"],
        ["enqueue", "demo.add", "--at", "+5", "--countdown", "5"],
    ],
)
def test_enqueue_refuses_impossible_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2


def test_enqueue_help_shows_a_time_the_gateway_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["enqueue", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "local time" in text
    for found in re.findall(r"\d{4}-\d{2}-\d{2}T[\d:]+Z", text):
        moment = dt.datetime.fromisoformat(found)
        assert moment - dt.datetime.now(dt.UTC) < dt.timedelta(days=365)
