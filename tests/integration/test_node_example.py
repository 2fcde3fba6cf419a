"""The Node.js example (examples/node) against a live server."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "node"


async def test_node_example_streams_demo_progress_to_the_end(server_port: int) -> None:
    node = shutil.which("node")
    if node is None or not (EXAMPLE / "node_modules").exists():
        if os.environ.get("CI"):
            pytest.fail("node or examples/node/node_modules missing (make install runs npm install there)")
        pytest.skip("node example not installed: run `make install`")
    process = await asyncio.create_subprocess_exec(
        node, str(EXAMPLE / "index.js"), f"127.0.0.1:{server_port}", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert any("3/3 step 3 of 3" in line for line in lines)
    assert lines[-1] == "done: TASK_STATE_SUCCEEDED result=3"
