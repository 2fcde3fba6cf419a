"""Retention: terminal tasks older than TASKGATE_RETENTION are deleted in batches; the rest stay."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa

from service.app import Runtime
from service.broker.fleet import WorkerInspector
from service.broker.publisher import send_only_app
from service.config import Settings
from service.store.operations import OperationsStore
from service.store.tables import tasks
from service.usecases import operations as ops_module
from service.usecases.operations import Operations
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc


def row(state: str, age_days: float, tag: str) -> dict[str, object]:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days)
    return {
        "task_id": f"{tag}-{uuid.uuid4()}", "task_name": "demo.add", "state": state, "args": [],
        "kwargs": {}, "options": {}, "fingerprint": "", "create_time": when, "run_time": when,
        "update_time": when, "end_time": when if state in ("SUCCEEDED", "FAILED", "CANCELLED") else None,
    }  # fmt: skip


async def test_old_terminal_tasks_are_deleted_in_batches(
    runtime: Runtime, stub: pb_grpc.TaskServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    old = [row(state, 40, tag) for state in ("SUCCEEDED", "FAILED", "CANCELLED") for _ in range(250)]
    kept = [row("SUCCEEDED", 5, tag), row("RUNNING", 40, tag), row("QUEUED", 40, tag)]
    async with runtime.store.engine.begin() as conn:
        await conn.execute(sa.insert(tasks), old + kept)
    monkeypatch.setattr(ops_module, "RETENTION_BATCH", 100)  # several batches
    monkeypatch.setattr(ops_module, "RETENTION_PAUSE", 0.0)
    operations = runtime.operations  # the settings' default retention: 30 days
    assert operations is not None
    deleted = await operations.purge()
    assert deleted >= len(old)  # other tests' rows may be old enough too (none are)
    async with runtime.store.engine.connect() as conn:
        left = set(await conn.scalars(sa.select(tasks.c.task_id).where(tasks.c.task_id.like(f"{tag}-%"))))
    assert left == {r["task_id"] for r in kept}
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetStatus(pb.GetStatusRequest(task_id=str(old[0]["task_id"])))
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND


async def test_zero_retention_keeps_everything(runtime: Runtime, settings: Settings) -> None:
    tag = uuid.uuid4().hex[:8]
    async with runtime.store.engine.begin() as conn:
        await conn.execute(sa.insert(tasks), [row("SUCCEEDED", 4000, tag)])
    inspector = WorkerInspector(send_only_app(settings))
    operations = Operations(OperationsStore(runtime.store.engine), None, inspector, retention=0)
    try:
        assert await operations.retention_step() == ops_module.RETENTION_INTERVAL
        assert await operations.purge() == 0
    finally:
        await operations.aclose()
    async with runtime.store.engine.connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).where(tasks.c.task_id.like(f"{tag}-%")))
    assert count == 1
