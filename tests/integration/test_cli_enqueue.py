"""``taskgate enqueue``: keyword arguments always go to the task; options go to the call."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tests.integration.test_cli import taskgate


async def test_kwargs_named_like_options_reach_the_task(server_port: int) -> None:
    kwargs = {"queue": "x", "countdown": 30, "priority": 3, "expire_time": "y", "request_id": "z"}
    code, out, err = await taskgate(
        server_port, "enqueue", "demo.echo", "--kwargs", json.dumps(kwargs), "--wait", "--timeout", "60"
    )
    assert code == 0, err
    result = json.loads(out.split("SUCCEEDED result: ", 1)[1])
    assert result == kwargs


async def test_options_are_options_and_kwargs_stay_kwargs(server_port: int) -> None:
    code, out, err = await taskgate(
        server_port, "enqueue", "demo.add", "--kwargs", '{"x": 1, "y": 2}',
        "--queue", "cli-options-nobody-listens", "--priority", "3", "--countdown", "600",
        "--expires", "2h", "--request-id", "cli-opt-1",
    )  # fmt: skip
    assert code == 0, err
    task_id = out.strip()
    code, out, _ = await taskgate(server_port, "status", task_id)
    task = json.loads(out)
    assert task["queue"] == "cli-options-nobody-listens"
    assert task["request_id"] == "cli-opt-1"
    run_time = dt.datetime.fromisoformat(task["run_time"])
    create_time = dt.datetime.fromisoformat(task["create_time"])
    assert run_time - create_time > dt.timedelta(seconds=500)


async def test_arguments_from_a_file_and_from_stdin(server_port: int, tmp_path: Path) -> None:
    args_file = tmp_path / "args.json"
    args_file.write_text("[20, 22]")
    code, out, err = await taskgate(server_port, "enqueue", "demo.add", "--args", f"@{args_file}", "--wait")
    assert code == 0, err
    assert "SUCCEEDED result: 42" in out
    stdin = b'{"x": 40, "y": 2}'
    code, out, err = await taskgate(
        server_port, "enqueue", "demo.add", "--kwargs", "-", "--wait", stdin=stdin
    )
    assert code == 0, err
    assert "SUCCEEDED result: 42" in out


async def test_a_payload_too_long_for_a_command_line(server_port: int, tmp_path: Path) -> None:
    big = {"text": "x" * 200_000}
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_text(json.dumps(big))
    code, out, err = await taskgate(
        server_port, "enqueue", "demo.echo", "--kwargs", f"@{kwargs_file}", "--wait"
    )
    assert code == 0, err
    assert json.loads(out.split("SUCCEEDED result: ", 1)[1]) == big


async def test_a_naive_run_time_says_its_zone(server_port: int) -> None:
    tomorrow = (dt.datetime.now() + dt.timedelta(days=1)).replace(microsecond=0).isoformat()
    code, out, err = await taskgate(server_port, "enqueue", "demo.add", "1", "2", "--at", tomorrow)
    assert code == 0, err
    task_id = out.strip()
    assert f"task {task_id} runs at" in err
    assert "read as local time" in err
    code, out, _ = await taskgate(server_port, "status", task_id)
    run_time = dt.datetime.fromisoformat(json.loads(out)["run_time"])
    assert run_time == dt.datetime.fromisoformat(tomorrow).astimezone()


async def test_errors_are_one_unwrapped_line_when_piped(server_port: int) -> None:
    name = "demo." + "a_rather_long_task_name_" * 5
    code, out, err = await taskgate(server_port, "enqueue", name, "1")
    assert code == 2
    assert out == ""
    assert len(err.rstrip("\n").splitlines()) == 1
    assert name in err
    code, _, err = await taskgate(server_port, "enqueue", "demo.add", "--args", "@/no/such/dir/" + "x" * 90)
    assert code == 2
    assert len(err.rstrip("\n").splitlines()) == 1
    assert "bad arguments: --args: cannot read /no/such/dir/" in err
