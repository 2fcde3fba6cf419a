"""Prometheus metrics of a gateway process: scraped after known traffic (a refused call too)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, wait_state
from tests.processes import gateway_process

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(port: int, name: str, count: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``count`` for demo.add (the recorder writes in batches,
    after GetStatus may already show the state from Redis); at most 10 s."""
    for _ in range(100):
        samples = scrape(port)
        if sample(samples, name, task_name="demo.add", **labels) >= count:
            break
        await asyncio.sleep(0.1)
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, code: str | None = None) -> dict[str, str]:
    labels = {"grpc_service": "taskgate.v1.TaskService", "grpc_method": method, "grpc_type": "unary"}
    return labels if code is None else {**labels, "grpc_code": code}


async def test_metrics_count_calls_codes_and_tasks(settings: Settings, worker: Path) -> None:
    port = free_port()
    # with the state feed on, a state is counted by the replica that writes it (each feed
    # entry goes to one consumer of the deployment's group: the sum over replicas counts it
    # once), and the session's other gateways read the same feed: this one alone must
    # write these tasks' states, from pub/sub
    async with (
        gateway_process(
            settings, TASKGATE_METRICS_LISTEN=f"127.0.0.1:{port}", TASKGATE_STATE_FEED="0"
        ) as gateway,
        aio.insecure_channel(gateway.target) as channel,
    ):
        stub = pb_grpc.TaskServiceStub(channel)
        ids = [
            (await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(i, 1)))).task_id
            for i in range(3)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Enqueue(pb.EnqueueRequest(task_name="no.such.task"))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        for task_id in ids:
            assert (await wait_state(stub, task_id)).state == pb.TASK_STATE_SUCCEEDED
        await scrape_until(port, "taskgate_task_transitions_total", 3, state="SUCCEEDED")
        samples = await scrape_until(port, "taskgate_task_run_seconds_count", 3)
    assert sample(samples, "grpc_server_started_total", **rpc("Enqueue")) == 4
    assert sample(samples, "grpc_server_handled_total", **rpc("Enqueue", "OK")) == 3
    assert sample(samples, "grpc_server_handled_total", **rpc("Enqueue", "INVALID_ARGUMENT")) == 1
    assert sample(samples, "grpc_server_handling_seconds_count", **rpc("Enqueue")) == 4
    assert sample(samples, "grpc_server_handled_total", **rpc("GetStatus", "OK")) >= 3
    assert sample(samples, "taskgate_tasks_enqueued_total", task_name="demo.add") == 3
    assert not any(
        s[0] == "taskgate_tasks_enqueued_total" and ("task_name", "no.such.task") in s[1] for s in samples
    )
    assert sample(samples, "taskgate_task_transitions_total", task_name="demo.add", state="SUCCEEDED") == 3
    assert sample(samples, "taskgate_task_run_seconds_count", task_name="demo.add") == 3
    assert sample(samples, "taskgate_broker_publish_seconds_count") >= 1
    assert sample(samples, "taskgate_event_loop_lag_seconds_count") > 0
    assert ("taskgate_outbox_pending", frozenset()) in samples
    assert ("taskgate_streams_open", frozenset()) in samples


async def test_no_metrics_listen_serves_nothing(settings: Settings, worker: Path) -> None:
    async with gateway_process(settings) as gateway:
        assert b"metrics on" not in gateway.output
