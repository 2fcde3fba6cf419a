"""``taskgate watch`` and ``enqueue --wait``: nothing is drawn for an unknown task; timeouts say what."""

from __future__ import annotations

import re

from tests.integration.test_cli import taskgate


async def test_watch_of_an_unknown_task_draws_no_bar(server_port: int) -> None:
    code, out, err = await taskgate(server_port, "watch", "no-such-task-id")
    assert code == 2
    assert out == ""
    assert err.startswith("NOT_FOUND: ")
    assert "0/?" not in err


async def test_a_timeout_names_the_task_and_its_state(server_port: int) -> None:
    code, out, err = await taskgate(server_port, "enqueue", "demo.sleep", "30", "--wait", "--timeout", "2")
    assert code == 3
    task_id = out.splitlines()[0]
    assert re.search(rf"timed out after 2 s waiting for {task_id} \(state (PENDING|RUNNING)\)", err), err
    assert "Deadline Exceeded" not in err
