"""``taskgate queues`` and ``taskgate workers`` (and the clients' list_queues/list_workers)
against the session gateway's runtime, served with OperationsService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.api.server import build_server
from service.app import Runtime
from service.config import Settings
from taskgate.client import AsyncClient, Client
from tests.integration.test_cli import taskgate


@pytest.fixture
async def operations_port(runtime: Runtime, settings: Settings) -> AsyncIterator[int]:
    assert runtime.operations is not None
    server, port = build_server(
        runtime.gateway, runtime.health, settings.listen, operations=runtime.operations
    )
    await server.start()
    yield port
    await server.stop(1)


async def test_clients_list_queues_and_workers(operations_port: int, run_id: str) -> None:
    queue = f"ops-cli-{run_id}"
    async with AsyncClient(f"127.0.0.1:{operations_port}") as client:
        await client.send_task("demo.add", (1, 2), queue=queue)
        queues = {q.name: q for q in await client.list_queues()}
        assert queues[queue].queued == 1
        for _ in range(20):  # the session worker may still be starting
            mine = [w for w in await client.list_workers() if w.hostname.startswith(f"test-{run_id}@")]
            if mine:
                break
            await asyncio.sleep(1)
        assert mine[0].last_seen_time is not None  # concurrency: 0 when stats() answered late

    def blocking() -> None:
        with Client(f"127.0.0.1:{operations_port}") as sync_client:
            assert queue in {q.name for q in sync_client.list_queues()}
            assert any(w.hostname.startswith(f"test-{run_id}@") for w in sync_client.list_workers())

    await asyncio.to_thread(blocking)


async def test_queues_and_workers_commands_print_tables(operations_port: int, run_id: str) -> None:
    queue = f"ops-table-{run_id}"
    async with AsyncClient(f"127.0.0.1:{operations_port}") as client:
        await client.send_task("demo.add", (1, 2), queue=queue)
    code, out, err = await taskgate(operations_port, "queues")
    assert code == 0, err
    row = next(line for line in out.splitlines() if queue in line)
    assert [cell.strip() for cell in row.split("│")[1:-1]] == [queue, "1", "1", "0", "0"]
    cells: list[str] = []
    for _ in range(20):  # until the worker answered every broadcast (stats() may be late)
        code, out, err = await taskgate(operations_port, "workers")
        assert code == 0, err
        rows = [line for line in out.splitlines() if f"test-{run_id}@" in line]
        cells = [cell.strip() for cell in rows[0].split("│")[1:-1]] if rows else []
        if cells and cells[2] == "8":
            break
        await asyncio.sleep(1)
    assert "celery" in cells[1] and cells[2] == "8"


async def test_commands_against_a_gateway_without_the_service(server_port: int) -> None:
    code, _, err = await taskgate(server_port, "queues")
    assert code == 2
    assert "UNIMPLEMENTED" in err
