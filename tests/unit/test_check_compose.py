"""The compose file checks (devtools.check_compose) on small compose snippets."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from devtools.check_compose import ROOT, check_document, check_file
from devtools.compose_file import Report, interpolate, load
from devtools.compose_start import map_paths, missing, mounts, rewrite_url, swap_ports

APP_ENV = {
    "CELERY_BROKER_URL": "redis://redis:6379/0",
    "CELERY_RESULT_BACKEND": "redis://redis:6379/0",
    "DATABASE_URL": "postgresql+asyncpg://postgres@postgres:5432/taskgate",
}


def compose(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\nUSER 10001\n", encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    report = Report(quiet=True)
    check_document(load(path), path, report)
    return report.problems


def test_service_healthy_target_without_healthcheck(tmp_path: Path) -> None:
    path = compose(
        tmp_path,
        """
        services:
          redis:
            image: redis:7-alpine
          worker:
            build: .
            depends_on:
              redis:
                condition: service_healthy
        """,
    )
    assert "redis: has no healthcheck, but worker wait(s) for service_healthy" in problems(path)


def test_healthcheck_satisfies_service_healthy(tmp_path: Path) -> None:
    path = compose(
        tmp_path,
        """
        services:
          redis:
            image: redis:7-alpine
            healthcheck:
              test: ["CMD", "redis-cli", "ping"]
          worker:
            build: .
            depends_on:
              redis:
                condition: service_healthy
        """,
    )
    assert not [p for p in problems(path) if "healthcheck" in p]


def test_mismatched_app_environment(tmp_path: Path) -> None:
    services = {
        "redis": {"image": "redis:7-alpine"},
        "postgres": {"image": "postgres:16-alpine"},
        "gateway": {"build": ".", "environment": {**APP_ENV, "TASKGATE_KEY_PREFIX": "a-"}},
        "worker": {"build": ".", "environment": {**APP_ENV, "TASKGATE_KEY_PREFIX": "b-"}},
    }
    path = compose(tmp_path, json.dumps({"services": services}))  # JSON is YAML
    found = problems(path)
    assert any(p.startswith("TASKGATE_KEY_PREFIX differs between app services") for p in found), found
    assert not any("CELERY_BROKER_URL" in p for p in found), found


def test_missing_required_setting_and_unknown_host(tmp_path: Path) -> None:
    path = compose(
        tmp_path,
        """
        services:
          gateway:
            build: .
            environment:
              CELERY_BROKER_URL: redis://cache:6379/0
              CELERY_RESULT_BACKEND: redis://cache:6379/0
        """,
    )
    found = problems(path)
    assert "gateway: environment has no DATABASE_URL" in found
    assert "gateway: CELERY_BROKER_URL points at 'cache', which is not a service" in found


def test_depends_on_cycle_and_restarting_oneshot(tmp_path: Path) -> None:
    path = compose(
        tmp_path,
        """
        services:
          migrate:
            build: .
            restart: unless-stopped
            depends_on: [gateway]
          gateway:
            build: .
            depends_on:
              migrate:
                condition: service_completed_successfully
        """,
    )
    found = problems(path)
    assert any(p.startswith("depends_on cycle: ") for p in found), found
    assert any(p.startswith("migrate: is waited for with service_completed_successfully") for p in found)


def test_dockerfile_running_as_root(tmp_path: Path) -> None:
    path = compose(tmp_path, "services:\n  gateway:\n    build: .\n")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim AS base\nUSER 10001\nFROM base\nUSER root\n")
    assert any("runs as root (USER root" in p for p in problems(path))


def test_the_projects_compose_file_passes() -> None:
    report = Report(quiet=True)
    check_file(ROOT / "docker-compose.yml", report)
    assert report.problems == []


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("$A/$$", {"A": "1"}, "1/$"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_start_check_rewrites() -> None:
    hosts = {"redis": "127.0.0.1:6380", "postgres": "127.0.0.1:5432"}
    assert rewrite_url("redis://redis:6379/0", hosts) == "redis://127.0.0.1:6380/0"
    assert rewrite_url("postgresql://u:p@postgres:5432/db", hosts) == "postgresql://u:p@127.0.0.1:5432/db"
    assert rewrite_url("0.0.0.0:50051", hosts) == "0.0.0.0:50051"
    assert swap_ports("grpc.insecure_channel('localhost:50051')", {50051: 41000}) == (
        "grpc.insecure_channel('localhost:41000')"
    )
    assert swap_ports("--port=5555 redis:6379", {5555: 1}) == "--port=1 redis:6379"


def test_start_check_maps_secrets_to_their_files(tmp_path: Path) -> None:
    doc = {"secrets": {"callers": {"file": "./deploy/callers.toml"}}}
    spec = {"secrets": ["callers"], "volumes": ["./certs:/etc/certs:ro", "data:/data"]}
    paths = mounts(spec, doc, tmp_path)
    assert map_paths("/run/secrets/callers", paths) == str(tmp_path / "deploy/callers.toml")
    assert map_paths("/etc/certs/server.pem", paths) == str(tmp_path / "certs/server.pem")
    assert map_paths("/data", paths) == "/data"


def test_start_check_names_what_is_missing() -> None:
    assert missing(["no-such-program-here"]) == "executable 'no-such-program-here' is not installed here"
    assert missing(["taskgate", "serve"]) is None
