"""Redis (broker and result backend) restarted empty, without AOF, while 50 tasks are queued,
prefetched and running: every task still ends in a terminal state that is true.

A private redis-server started with ``--save "" --appendonly no`` is killed (SIGKILL) and
started again on the same port with nothing in it: the queue, kombu's unacked hash, the
result documents, the run-once claims, the heartbeats and the state feed are gone. The
gateway process runs a recovery pass every second (a QUEUED task is looked for in the
broker 2 s after publishing). The worker runs ``demo.sleep`` (opted in to re-runs) with
four threads and a prefetch of sixteen; its log is the evidence of every run.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from grpc import aio

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import child_env
from tests.helpers import enqueue, worker_group
from tests.integration.test_outbox import PrivateRedis
from tests.integration.test_worker_faults import private_database
from tests.processes import gateway_process

TASKS = 50
#: Seconds the tasks may take to settle after Redis returns (far above what they need).
WAIT = 180.0
TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}
#: The gateway's recovery runs every second and looks for a QUEUED task in the broker 2 s
#: after publishing; workers heartbeat every second.
GATEWAY_ENV = {
    "TASKGATE_RECOVERY_INTERVAL": "1",
    "TASKGATE_WORKER_LOST_TIMEOUT": "5",
    "TASKGATE_LOST_QUEUED_AFTER": "2",
    "TASKGATE_WORKER_HEARTBEAT": "1",
    "TASKGATE_OUTBOX_POLL_INTERVAL": "0.2",
    "TASKGATE_SHUTDOWN_GRACE": "1",
}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server that keeps nothing across a restart (PrivateRedis starts it
    with ``--save "" --appendonly no``)."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def empty_settings(settings: Settings, run_id: str, redis_server: PrivateRedis) -> Iterator[Settings]:
    with private_database(run_id) as url:
        update = {"database_url": url, "broker_url": redis_server.url, "result_backend": redis_server.url}
        yield settings.model_copy(update=update)


def kill_and_restart_empty(server: PrivateRedis) -> None:
    """SIGKILL the server (nothing saved) and start a new, empty one on the same port."""
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server.process = None
    server.start()
    client = server.client()
    persistence = client.info("persistence")
    client.close()
    assert persistence["aof_enabled"] == 0
    assert persistence["rdb_last_load_keys_loaded"] == 0  # it came back with nothing


@contextmanager
def worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker with four threads (prefetch 16) in a process group of its own."""
    env = child_env(settings, TASKGATE_WORKER_HEARTBEAT="1")
    node = f"empty-{uuid.uuid4().hex[:6]}@restart"
    with worker_group(env, log_path, "-c", "4", "-n", node, graceful=True) as process:
        yield process


async def states(stub: pb_grpc.TaskServiceStub, ids: list[str]) -> dict[str, pb.Task]:
    """What the gateway says of each task now."""
    return {i: (await stub.GetStatus(pb.GetStatusRequest(task_id=i))).task for i in ids}


def succeeded_runs(logs: list[Path]) -> collections.Counter[str]:
    """Runs of demo.sleep that finished, per task id, from the workers' logs."""
    counts: collections.Counter[str] = collections.Counter()
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if "demo.sleep[" in line and "] succeeded in" in line:
                counts[line.split("demo.sleep[", 1)[1].split("]", 1)[0]] += 1
    return counts


async def settle(
    stub: pb_grpc.TaskServiceStub,
    ids: list[str],
    stack: ExitStack,
    workers: list[subprocess.Popen[bytes]],
    logs: list[Path],
    settings: Settings,
) -> dict[str, pb.Task]:
    """The tasks once every one is terminal. A worker that died meanwhile (kombu's Redis
    transport can crash a worker holding unacked messages when Redis restarts) is replaced,
    as its supervisor would: its running tasks are then re-run (demo.sleep opted in)."""
    async with asyncio.timeout(WAIT):
        while True:
            now = await states(stub, ids)
            if all(task.state in TERMINAL for task in now.values()):
                return now
            if workers[-1].poll() is not None:
                logs.append(logs[0].with_name(f"replacement-{len(logs)}.log"))
                workers.append(stack.enter_context(worker(settings, logs[-1])))
            await asyncio.sleep(0.5)


async def test_redis_restarted_empty_leaves_no_task_queued_or_running(
    empty_settings: Settings, redis_server: PrivateRedis, tmp_path: Path
) -> None:
    logs = [tmp_path / "worker.log"]
    async with gateway_process(empty_settings, **GATEWAY_ENV) as gateway:
        async with aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            with ExitStack() as stack:
                workers = [stack.enter_context(worker(empty_settings, logs[0]))]
                ids = [await enqueue(stub, "demo.sleep", 1.0) for _ in range(TASKS)]
                async with asyncio.timeout(60):  # some finished, some running, the rest waiting
                    while True:
                        seen = collections.Counter(t.state for t in (await states(stub, ids)).values())
                        if seen[pb.TASK_STATE_SUCCEEDED] >= 8 and seen[pb.TASK_STATE_RUNNING] >= 2:
                            break
                        await asyncio.sleep(0.1)
                kill_and_restart_empty(redis_server)
                at_restart = await states(stub, ids)  # answered from the database
                await settle(stub, ids, stack, workers, logs, empty_settings)
                await asyncio.sleep(3)  # several passes: room for a late duplicate run to show itself
                after = await states(stub, ids)
        await gateway.stop()
    runs = succeeded_runs(logs)
    waiting = [i for i in ids if at_restart[i].state == pb.TASK_STATE_QUEUED]
    assert waiting, "no task was waiting when Redis restarted"
    for task_id in ids:
        task, before = after[task_id], pb.TaskState.Name(at_restart[task_id].state)
        # every task ends SUCCEEDED: those waiting (their messages gone with Redis) were
        # republished by the recovery pass, those running finished on the worker and wrote
        # their result to the new Redis (the state feed's group is created again)
        assert task.state == pb.TASK_STATE_SUCCEEDED, (task_id, before, task.error)
        # and ran to completion once, on whichever delivery claimed it first
        assert runs[task_id] == 1, (task_id, before, runs[task_id])
    assert b"the broker no longer holds republished" in gateway.output
