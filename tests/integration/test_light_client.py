"""The client distribution installs alone: no server code, no server dependencies.

A fresh venv gets ``pip install clients/python`` (a regular wheel build from the index, the
way a caller installs it); then, in that venv, the server's packages must not import and a
small script enqueues ``demo.add`` through ``taskgate.client.Client`` against the gateway of
this run and waits for its result.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What a caller must not get: Celery (only with the `worker` extra), the store's drivers, and
# the server's own top-level packages.
SERVER_ONLY = ("celery", "kombu", "sqlalchemy", "asyncpg", "alembic", "service", "workers")

PROBE = """
import importlib, json, sys
found = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    found.append(name)
print(json.dumps(found))
"""

ENQUEUE = """
import json, sys
from taskgate.client import Client
with Client(sys.argv[1]) as client:
    task = client.wait(client.enqueue("demo.add", 2, 3), timeout=60)
print(json.dumps({"state": str(task.state), "result": task.result, "file": __import__("taskgate").__file__}))
"""

pytestmark = pytest.mark.timeout(300)


async def run(*command: str | Path, cwd: Path, timeout: float = 240) -> str:
    """Runs ``command`` outside the repository (so the checkout is not on sys.path); returns stdout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, f"{command} failed:\n{out.decode()}\n{err.decode()}"
    return out.decode()


@pytest.fixture(scope="module")
async def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding only ``pip install clients/python``."""
    home = tmp_path_factory.mktemp("light-client")
    await run(sys.executable, "-m", "venv", home / "venv", cwd=home)
    python = home / "venv" / "bin" / "python"
    await run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        ROOT / "clients" / "python",
        cwd=home,
    )
    return python


async def test_the_client_venv_has_no_server_code_or_dependencies(light_python: Path) -> None:
    found = json.loads(await run(light_python, "-c", PROBE, *SERVER_ONLY, cwd=light_python.parent))
    assert found == []


async def test_the_client_alone_enqueues_and_waits(light_python: Path, server_port: int) -> None:
    out = await run(light_python, "-c", ENQUEUE, f"127.0.0.1:{server_port}", cwd=light_python.parent)
    answer = json.loads(out)
    assert answer["state"] == "SUCCEEDED"
    assert answer["result"] == 5
    assert Path(answer["file"]).is_relative_to(light_python.parent.parent)
