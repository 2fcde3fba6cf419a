"""``taskgate serve`` and ``migrate`` without their database or Redis: one line, exit status 2."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy.engine import make_url

from service.cli.startup import database_endpoint
from service.config import Settings
from tests.conftest import child_env
from tests.integration.test_cli import run_cli


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # closed again on leaving: nothing listens there


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_serve_without_its_database(settings: Settings) -> None:
    name = make_url(settings.database_url).database + "_missing"
    url = make_url(settings.database_url).set(database=name).render_as_string(hide_password=False)
    code, _, err = await run_cli(
        "serve", env=child_env(settings, DATABASE_URL=url, TASKGATE_LISTEN="127.0.0.1:0")
    )
    assert code == 2
    line = _one_line(err)
    where = database_endpoint(url)
    assert line == f'taskgate serve: database "{name}" does not exist on {where}: run `taskgate migrate`'


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_database_port_closed(settings: Settings, command: str) -> None:
    port = _closed_port()
    url = (
        make_url(settings.database_url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    )
    code, _, err = await run_cli(
        command, env=child_env(settings, DATABASE_URL=url, TASKGATE_LISTEN="127.0.0.1:0")
    )
    assert code == 2
    line = _one_line(err)
    assert (
        line == f"taskgate {command}: cannot connect to 127.0.0.1:{port} (DATABASE_URL): connection refused"
    )


async def test_serve_without_redis(settings: Settings) -> None:
    port = _closed_port()
    env = child_env(settings, CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0", TASKGATE_LISTEN="127.0.0.1:0")
    code, _, err = await run_cli("serve", env=env)
    assert code == 2
    line = _one_line(err)
    assert (
        line == f"taskgate serve: cannot connect to 127.0.0.1:{port} (CELERY_BROKER_URL): connection refused"
    )
