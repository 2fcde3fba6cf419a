"""The gateway behind PgBouncer in transaction pooling mode (``TASKGATE_DB_PGBOUNCER=1``).

The test starts its own ``pgbouncer`` (Debian's package) on a free port in front of a
private database, with few server connections so consecutive transactions of one client
land on different ones: a prepared statement that outlived its transaction would fail
("prepared statement ... does not exist" / "already exists"). Two gateways share it: group
commit, COPY, the relay's ``SKIP LOCKED`` claims and the recorder's writes all go through it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy.engine import make_url

from service.config import Settings
from service.store.tasks import TaskStore
from taskgate.v1 import task_service_pb2 as pb
from tests.amqp_fixtures import FAST, broker_worker, private_settings, stub_for, wait_runs
from tests.helpers import args, wait_state
from tests.processes import gateway_process

INI = """\
[databases]
* = host={host} port={port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = 4
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def pg_settings(settings: Settings, run_id: str) -> Iterator[Settings]:
    """This test's own database and key prefix (Redis broker)."""
    with private_settings(settings, run_id) as private:
        yield private


@pytest.fixture
def pgbouncer(tmp_path: Path, pg_settings: Settings) -> Iterator[str]:
    """A PgBouncer (transaction pooling) in front of the test's database; yields its URL."""
    if shutil.which("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    target = make_url(pg_settings.database_url)
    listen = free_port()
    users = tmp_path / "users.txt"
    users.write_text(f'"{target.username}" ""\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(INI.format(host=target.host, port=target.port, listen=listen, users=users))
    command = ["pgbouncer", str(ini)]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]  # pgbouncer refuses to run as root
    log = (tmp_path / "pgbouncer.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = target.set(port=listen).render_as_string(hide_password=False)
    asyncio.run(wait_connectable(url))
    yield url
    process.terminate()
    process.wait(10)
    log.close()


async def wait_connectable(url: str) -> None:
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    async with asyncio.timeout(15):
        while True:
            try:
                connection = await asyncpg.connect(plain, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError):
                await asyncio.sleep(0.1)
                continue
            await connection.close()
            return


def ts(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_two_gateways_behind_pgbouncer_run_every_task_once(
    pg_settings: Settings, pgbouncer: str, tmp_path: Path
) -> None:
    settings = pg_settings.model_copy(update={"database_url": pgbouncer})
    env = {"TASKGATE_DB_PGBOUNCER": "1", "TASKGATE_SCHEDULE_HORIZON": "1", **FAST}
    run = uuid.uuid4().hex[:6]
    single = [f"one-{run}-{i}" for i in range(300)]
    batched = [f"batch-{run}-{i}" for i in range(200)]
    held = [f"held-{run}-{i}" for i in range(40)]
    with broker_worker(settings, tmp_path):
        async with (
            gateway_process(settings, **env) as first,
            gateway_process(settings, **env) as second,
            stub_for(first) as stub_a,
            stub_for(second) as stub_b,
        ):
            stubs = (stub_a, stub_b)
            requests = [pb.EnqueueRequest(task_name="demo.record", args=args(tag)) for tag in single]
            accepted = await asyncio.gather(*(stubs[i % 2].Enqueue(r) for i, r in enumerate(requests)))
            for half in (batched[:100], batched[100:]):  # 100 rows: the COPY path
                tasks = [pb.BatchTask(task_name="demo.record", args=args(tag)) for tag in half]
                await stub_b.EnqueueBatch(pb.EnqueueBatchRequest(tasks=tasks))
            run_time = ts(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3))
            for i, tag in enumerate(held):  # held in the database, claimed by either relay
                request = pb.EnqueueAtRequest(task_name="demo.record", args=args(tag), run_time=run_time)
                await stubs[i % 2].EnqueueAt(request)
            counts = await wait_runs(settings, single + batched + held)
            for response in accepted[:20]:  # the recorders' writes went through PgBouncer too
                task = await wait_state(stub_a, response.task_id)
                assert task.state == pb.TASK_STATE_SUCCEEDED
    assert all(counts[tag] == 1 for tag in single + batched + held)
    for gateway in (first, second):
        assert b"prepared statement" not in gateway.output, gateway.output.decode()[-3000:]


async def test_without_the_setting_pgbouncer_breaks_prepared_statements(
    pgbouncer: str,
) -> None:
    """Why the setting exists: the default (cached, named statements) fails behind it."""
    store = TaskStore.connect(pgbouncer, pool_size=8)
    try:
        outcome = await asyncio.gather(
            *(store.get(uuid.uuid4().hex) for _ in range(200)), return_exceptions=True
        )
    finally:
        await store.close()
    assert any(isinstance(result, Exception) for result in outcome)
    fixed = TaskStore.connect(pgbouncer, pool_size=8, pgbouncer=True)
    try:
        outcome = await asyncio.gather(
            *(fixed.get(uuid.uuid4().hex) for _ in range(200)), return_exceptions=True
        )
    finally:
        await fixed.close()
    assert not [result for result in outcome if isinstance(result, Exception)]
