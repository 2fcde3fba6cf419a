"""The workflows store on each database: all-or-nothing insert with the compact tree, the
loop's ``needing_attention`` query, and the stream's ``version``."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa

from service.domain.model import Delivery, TaskState
from service.domain.workflow import (
    ChainStep,
    GroupStep,
    TaskStep,
    WorkflowRecord,
    tasks_of,
    to_json,
    with_ids,
)
from service.store.rows import NewTask
from service.store.tasks import TaskStore, tasks
from service.store.workflows import WorkflowStore


def _workflow() -> WorkflowRecord:
    """A chord (two members, then a body) with fresh ids."""
    members = tuple(TaskStep(path=f"g{i}", task_name="demo.add", args=[i, i]) for i in range(2))
    root = with_ids(ChainStep("root", (GroupStep("g", members), TaskStep(path="b", task_name="demo.sum"))))
    now = dt.datetime.now(dt.UTC)
    return WorkflowRecord(str(uuid.uuid4()), "tester", "", "", root, TaskState.QUEUED, now)


def _rows(workflow: WorkflowRecord) -> list[NewTask]:
    steps = list(tasks_of(workflow.root))
    return [
        NewTask(
            delivery=Delivery(step.task_id, step.task_name, step.args, step.kwargs, workflow.create_time),
            state=TaskState.WAITING if step is steps[-1] else TaskState.QUEUED,
            caller=workflow.caller,
            request_id="",
            create_time=workflow.create_time,
            fingerprint="",
            publish_after=None,
            held=False,
            workflow_id=workflow.workflow_id,
        )
        for step in steps
    ]


async def _set(store: TaskStore, task_ids: list[str], state: TaskState) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.update(tasks)
            .where(tasks.c.task_id.in_(task_ids))
            .values(state=state.value, update_time=dt.datetime.now(dt.UTC))
        )


async def _inserted(store: TaskStore) -> tuple[WorkflowStore, WorkflowRecord]:
    flows = WorkflowStore(store.engine)
    workflow = _workflow()
    assert await flows.insert(workflow, _rows(workflow)) is None
    return flows, workflow


async def test_insert_keeps_the_whole_tree(store: TaskStore) -> None:
    flows, workflow = await _inserted(store)
    read = await flows.get(workflow.workflow_id)
    assert read is not None and to_json(read.root) == to_json(workflow.root)  # (paths rebuilt)
    steps = await flows.steps(workflow.workflow_id)
    assert [steps[task_id].state for task_id in workflow.task_ids] == [
        TaskState.QUEUED,
        TaskState.QUEUED,
        TaskState.WAITING,
    ]


async def test_needing_attention_finds_only_workflows_with_something_to_do(store: TaskStore) -> None:
    flows, workflow = await _inserted(store)
    wanted = workflow.workflow_id

    async def found(since: dt.datetime | None = None) -> bool:
        return wanted in {w.workflow_id for w in await flows.needing_attention(1000, since)}

    assert not await found()  # queued and waiting steps: nothing to do
    first, second, body = workflow.task_ids
    await _set(store, [first], TaskState.SUCCEEDED)
    assert not await found()
    await _set(store, [second], TaskState.FAILED)  # the body can no longer run
    assert await found()
    assert await found(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    assert not await found(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))  # nothing changed since
    await _set(store, [second, body], TaskState.SUCCEEDED)  # nothing left to run: to be finished
    assert await found()
    await flows.finish(wanted, TaskState.SUCCEEDED, dt.datetime.now(dt.UTC))
    assert not await found()


async def test_version_moves_with_any_change(store: TaskStore) -> None:
    flows, workflow = await _inserted(store)
    before = await flows.version(workflow.workflow_id)
    if store.engine.dialect.name != "postgresql":
        assert before is None  # read the steps every time
        return
    assert before is not None and await flows.version(workflow.workflow_id) == before
    await _set(store, [workflow.task_ids[0]], TaskState.RUNNING)
    after = await flows.version(workflow.workflow_id)
    assert after != before
    await flows.finish(workflow.workflow_id, TaskState.CANCELLED, dt.datetime.now(dt.UTC))
    assert await flows.version(workflow.workflow_id) != after
