"""The compose start check (devtools.compose_run) against the real PostgreSQL and Redis.

It starts each app service of docker-compose.yml as compose would (migrate to completion, then
the gateway until its healthcheck passes, the worker and beat for a few seconds), and must
catch a gateway that exits at start-up, which compose's ``restart: unless-stopped`` would
turn into a crash loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from devtools.compose_file import load
from devtools.compose_run import run_start_check
from devtools.compose_start import private_stack
from tests.conftest import PG_ADMIN_URL, REDIS_URL, ROOT


def test_every_app_service_of_the_compose_file_starts() -> None:
    report = run_start_check(ROOT / "docker-compose.yml", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL)
    assert report.problems == []


def old_compose(tmp_path: Path) -> Path:
    """The compose file as it was before the callers secret: 0.0.0.0 and no TASKGATE_AUTH_FILE."""
    doc = load(ROOT / "docker-compose.yml")
    doc.pop("secrets", None)
    for spec in doc["services"].values():
        spec.pop("secrets", None)
        if isinstance(spec.get("environment"), dict):
            spec["environment"].pop("TASKGATE_AUTH_FILE", None)
        if isinstance(spec.get("build"), dict):
            spec["build"]["context"] = str(ROOT)
    assert doc["services"]["gateway"]["environment"]["TASKGATE_LISTEN"] == "0.0.0.0:50051"
    path = tmp_path / "docker-compose.yml"
    path.write_text(json.dumps(doc), encoding="utf-8")  # JSON is YAML
    return path


def test_start_check_catches_the_old_crash_loop(tmp_path: Path) -> None:
    report = run_start_check(
        old_compose(tmp_path), only=["migrate", "gateway"], pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    )
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.startswith("gateway: exited 2 after"), problem
    assert "refusing to listen on 0.0.0.0:" in problem


async def _exists(name: str) -> bool:
    engine = create_async_engine(PG_ADMIN_URL, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
    finally:
        await engine.dispose()
    return found is not None


def test_private_stack_creates_and_drops_its_database() -> None:
    with private_stack(PG_ADMIN_URL, REDIS_URL) as stack:
        name = stack.database_url.rsplit("/", 1)[1]
        assert asyncio.run(_exists(name))
        assert stack.key_prefix.startswith("tgcompose-")
    assert not asyncio.run(_exists(name))
