"""``taskgate migrate`` with TASKGATE_LOG_FORMAT=json: every stderr line parses as JSON."""

from __future__ import annotations

import json

from service.config import Settings
from tests.conftest import child_env
from tests.integration.test_cli import run_cli


async def test_json_log_lines_parse(settings: Settings) -> None:
    env = child_env(settings, TASKGATE_LOG_FORMAT="json", TASKGATE_LOG_LEVEL="DEBUG")
    code, _, err = await run_cli("migrate", env=env)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines
    assert {"time", "level", "logger", "message"} <= set(lines[-1])
    assert any(line["message"] == "database schema is current" for line in lines)
