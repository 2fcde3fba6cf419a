"""Every command and code block of README.md, run against a live ``taskgate dev``.

``taskgate dev`` runs in a temporary directory on a free port (a private Redis, SQLite, one
worker, the gateway), as tests/integration/test_dev.py starts it. Each fenced block of the
README is one test, run as tests/readme_blocks.py describes: shell lines from the repository
root with ``TASKGATE_TARGET`` set to the live gateway, Python blocks as scripts in an empty
directory, the address ``127.0.0.1:50051`` and ``<task id>`` filled in mechanically. A block
marked ``<!-- readme-test: skip (reason) -->`` is reported as skipped with that reason;
nothing else is skipped, and an unknown kind of block fails the parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import readme_blocks
from tests.conftest import ROOT
from tests.integration.test_dev import DevProcess, dev_env
from tests.readme_blocks import Block

README = ROOT / "README.md"
BLOCKS = readme_blocks.parse(README.read_text(encoding="utf-8"))
#: Seconds one shell line or one Python block may take.
STEP_TIMEOUT = 90
#: Seconds a whole block may take: a block of several CLI lines pays a Python start-up per
#: line (seconds each on a busy 2-core machine), on top of the tasks it waits for.
BLOCK_TIMEOUT = 300


@pytest.fixture(scope="module")
async def dev(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevProcess]:
    """One ``taskgate dev`` for every block of the README."""
    process = await DevProcess.start(tmp_path_factory.mktemp("readme-dev"), dev_env())
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            await process.interrupt()  # Ctrl-C, as a person stops it
        await process.kill()


async def run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    """Run ``argv``; its output (stdout and stderr), which must end with exit status 0."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), STEP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"README: timed out after {STEP_TIMEOUT} s: {what}") from None
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"README: exit {process.returncode}: {what}\n{text}"
    return text


def client_env(target: str) -> dict[str, str]:
    """The environment of a README command: the CLI's default gateway is the live one."""
    return {**os.environ, "TASKGATE_TARGET": target, "PYTHONUNBUFFERED": "1"}


async def run_shell(block: Block, target: str) -> None:
    """Each line on its own (assignment lines go in front of the later ones), from the root."""
    setup: list[str] = []
    task_id: str | None = None
    for line in readme_blocks.shell_lines(block.code):
        if readme_blocks.is_assignment(line):
            setup.append(readme_blocks.substitute(line, target, task_id))
            continue
        command = readme_blocks.substitute(line, target, task_id)
        script = "\n".join([*setup, command])
        out = await run(["/bin/sh", "-c", script], ROOT, client_env(target), command)
        task_id = readme_blocks.last_task_id(out) or task_id


async def run_python(block: Block, target: str, workdir: Path) -> None:
    """The block as one script, in a directory outside the repository."""
    script = workdir / f"readme_{block.line}.py"
    script.write_text(readme_blocks.substitute(block.code, target, None), encoding="utf-8")
    await run([sys.executable, str(script)], workdir, client_env(target), f"the Python block at {block.name}")


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    assert BLOCKS, "README.md has no code blocks"
    assert len(COMMANDS) + len(DOCUMENTS) + len(SKIPPED) == len(BLOCKS), "a block is neither run nor skipped"
    run_kinds = {block.lang for block in BLOCKS if block.skip is None}
    assert {"sh", "python"} <= run_kinds, "the README's commands and Python examples must be run"


def _ids(blocks: list[Block]) -> list[str]:
    return [block.name for block in blocks]


COMMANDS = [block for block in BLOCKS if block.skip is None and block.lang in ("sh", "python")]
DOCUMENTS = [block for block in BLOCKS if block.skip is None and block.lang in ("toml", "text")]
SKIPPED = [block for block in BLOCKS if block.skip is not None]


@pytest.mark.timeout(BLOCK_TIMEOUT)
@pytest.mark.parametrize("block", COMMANDS, ids=_ids(COMMANDS))
async def test_readme_command(block: Block, dev: DevProcess, tmp_path: Path) -> None:
    if block.lang == "sh":
        await run_shell(block, dev.target)
    else:
        await run_python(block, dev.target, tmp_path)


@pytest.mark.parametrize("block", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_readme_document(block: Block) -> None:
    if block.lang == "toml":
        tomllib.loads(block.code)
    else:
        missing = readme_blocks.map_paths(block.code, ROOT)
        assert not missing, f"README {block.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("block", SKIPPED, ids=_ids(SKIPPED))
def test_readme_skipped_block(block: Block) -> None:
    pytest.skip(f"README {block.name} is not run: {block.skip}")


def test_the_runner_fills_placeholders_and_refuses_unknown_ones() -> None:
    sub = readme_blocks.substitute
    assert sub("x 127.0.0.1:50051 <task id>", "127.0.0.1:9", "abc") == "x 127.0.0.1:9 abc"
    with pytest.raises(readme_blocks.ReadmeFormatError, match="before any line"):
        sub("status <task id>", "t", None)
    with pytest.raises(readme_blocks.ReadmeFormatError, match="placeholders"):
        sub("status <your token>", "t", None)
    assert readme_blocks.is_assignment('B="buf curl -x"') and readme_blocks.is_assignment("export A=1 C=2")
    assert not readme_blocks.is_assignment("A=1 taskgate status x")


def test_the_parser_needs_a_reason_and_a_known_kind() -> None:
    parse = readme_blocks.parse
    skipped = parse("<!-- readme-test: skip (needs Docker) -->\n\n```sh\nmake dev\n```\n")
    assert skipped == [Block("sh", "make dev\n", 3, "needs Docker")]
    for bad in (
        "<!-- readme-test: skip -->\n```sh\nx\n```\n",
        "<!-- readme-test: run (x) -->\n```sh\nx\n```\n",
        "```yaml\nx: 1\n```\n",
        "<!-- readme-test: skip (x) -->\ntext\n```sh\nx\n```\n",
        "```sh\nx\n",
    ):
        with pytest.raises(readme_blocks.ReadmeFormatError):
            parse(bad)
