"""``taskgate schedules …`` against the real stack, and ``schedules import`` of a Celery app's
beat_schedule written to a temporary module (run on a thread: the server shares the loop)."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.api.server import build_server
from service.app import Runtime
from service.cli.main import main

BEAT_APP = """
from datetime import timedelta

from celery import Celery
from celery.schedules import crontab, schedule


class Jittered(schedule):
    # a custom schedule class: nothing to translate it to
    pass

app = Celery("beatapp")
app.conf.timezone = "Europe/Berlin"
app.conf.beat_schedule = {{
    "{prefix}-nightly": {{
        "task": "demo.add",
        "schedule": crontab(minute=30, hour=2, day_of_week="mon-fri"),
        "args": (1, 2),
        "options": {{"queue": "celery", "priority": 3, "expires": 600}},
    }},
    "{prefix}-every-10s": {{"task": "demo.echo", "schedule": timedelta(seconds=10), "kwargs": {{"x": 1}}}},
    "{prefix}-every-90s": {{"task": "demo.add", "schedule": 90.0, "args": [2, 2]}},
    "{prefix}-custom": {{"task": "demo.add", "schedule": Jittered(60), "args": [0, 0]}},
}}
"""


@pytest.fixture(scope="module")
async def target(runtime: Runtime) -> AsyncIterator[str]:
    server, port = build_server(runtime.gateway, runtime.health, "127.0.0.1:0", schedules=runtime.schedules)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
def beat_module(tmp_path: Path) -> Iterator[tuple[str, str]]:
    prefix = f"beat{uuid.uuid4().hex[:6]}"
    name = f"beatapp_{prefix}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(BEAT_APP.format(prefix=prefix)))
    sys.path.insert(0, str(tmp_path))
    yield name, prefix
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_schedules_commands(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    schedule_id = f"cli-{uuid.uuid4().hex[:8]}"
    code, out, _ = await run(
        capsys, "schedules", "create", schedule_id, "--cron", "@daily", "--time-zone", "America/New_York",
        "--task", "demo.add", "--args", "[1, 2]", "--target", target,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["cron"] == "0 0 * * *"
    code, out, _ = await run(capsys, "schedules", "pause", schedule_id, "--target", target)
    assert code == 0 and json.loads(out)["paused"] is True
    code, out, _ = await run(capsys, "schedules", "resume", schedule_id, "--target", target)
    assert code == 0 and json.loads(out)["next_run_time"]
    code, out, _ = await run(
        capsys, "schedules", "update", schedule_id, "--interval", "7200", "--target", target
    )
    assert code == 0 and json.loads(out)["interval"] == 7200
    code, out, _ = await run(capsys, "schedules", "list", "--page-size", "1000", "--target", target)
    assert schedule_id in [json.loads(line).get("schedule_id") for line in out.splitlines()]
    code, out, _ = await run(capsys, "schedules", "trigger", schedule_id, "--target", target)
    assert code == 0 and len(out.strip()) == 36
    code, out, _ = await run(capsys, "schedules", "get", schedule_id, "--target", target)
    assert json.loads(out)["last_task_id"]
    code, _, _ = await run(capsys, "schedules", "delete", schedule_id, "--target", target)
    assert code == 0
    code, _, err = await run(capsys, "schedules", "get", schedule_id, "--target", target)
    assert code == 2 and "NOT_FOUND" in err


async def test_import_beat_schedule(
    target: str, beat_module: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    module, prefix = beat_module
    code, out, err = await run(
        capsys, "schedules", "import", f"{module}:app", "--dry-run", "--target", target
    )
    assert code == 2  # the solar entry is reported
    assert f"would create {prefix}-nightly" in out and f"would create {prefix}-every-10s" in out
    assert f"'{prefix}-custom'" in err and "custom schedule class Jittered" in err
    code, _, _ = await run(capsys, "schedules", "get", f"{prefix}-nightly", "--target", target)
    assert code == 2  # a dry run changes nothing

    code, out, err = await run(capsys, "schedules", "import", f"{module}:app", "--target", target)
    assert f"create {prefix}-every-90s" in out and "custom" in err
    _, out, _ = await run(capsys, "schedules", "get", f"{prefix}-nightly", "--target", target)
    nightly = json.loads(out)
    assert nightly["cron"] == "30 2 * * mon-fri" and nightly["time_zone"] == "Europe/Berlin"
    assert nightly["args"] == [1, 2] and nightly["queue"] == "celery" and nightly["priority"] == 3
    _, out, _ = await run(capsys, "schedules", "get", f"{prefix}-every-10s", "--target", target)
    assert json.loads(out)["interval"] == 10 and json.loads(out)["kwargs"] == {"x": 1}

    code, out, _ = await run(capsys, "schedules", "import", f"{module}:app", "--target", target)
    assert f"update {prefix}-nightly" in out  # a second import updates in place
    for name in ("nightly", "every-10s", "every-90s"):
        await run(capsys, "schedules", "delete", f"{prefix}-{name}", "--target", target)
