"""Tracing through the OTEL_* variables: one trace from the caller's traceparent through the
gateway's server span into the worker's task span, received by a local OTLP/HTTP receiver;
and with no OTEL_* variable, nothing traced and no trace header on the message."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from grpc import aio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from service.config import Settings
from service.runtime import tracing
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT, child_env, stop_process
from tests.helpers import args, wait_state
from tests.processes import gateway_process


class Receiver:
    """A local OTLP/HTTP receiver: every POST /v1/traces body, decoded."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.requests.append(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self, trace_id: str) -> dict[str, list[str]]:
        """The names of the spans of ``trace_id``, per service name."""
        found: dict[str, list[str]] = {}
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        if span.trace_id.hex() == trace_id:
                            found.setdefault(attrs.get("service.name", ""), []).append(span.name)
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def _otel_env(receiver: Receiver, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


@pytest.fixture
def traced_worker(settings: Settings, receiver: Receiver, run_id: str, tmp_path: Path) -> Iterator[str]:
    """A private worker (its own queue) tracing to the receiver; yields the queue."""
    queue = f"otel-{run_id}"
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "threads", "-c", "2",
        "-Q", queue, "-n", f"otel-{run_id}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    env = child_env(settings, **_otel_env(receiver, "tg-test-worker"))
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield queue
    stop_process(process)


def _traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


async def test_one_trace_from_the_caller_through_the_worker(
    settings: Settings, receiver: Receiver, traced_worker: str
) -> None:
    trace_id, traceparent = _traceparent()
    async with gateway_process(settings, **_otel_env(receiver, "tg-test-gateway")) as gateway:
        async with aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            request = pb.EnqueueRequest(task_name="demo.add", args=args(2, 3), queue=traced_worker)
            response = await stub.Enqueue(request, metadata=(("traceparent", traceparent),))
            task = await wait_state(stub, response.task_id, timeout=60)
            assert task.state == pb.TASK_STATE_SUCCEEDED
            deadline = time.monotonic() + 30
            while True:
                spans = receiver.spans(trace_id)
                if "tg-test-gateway" in spans and "tg-test-worker" in spans:
                    break
                assert time.monotonic() < deadline, f"spans of the trace: {spans}"
                await asyncio.sleep(0.2)
        await gateway.stop()
    assert "taskgate.v1.TaskService/Enqueue" in spans["tg-test-gateway"]
    assert any("demo.add" in name for name in spans["tg-test-worker"]), spans


async def test_no_otel_variables_no_tracing(settings: Settings, run_id: str) -> None:
    assert tracing.exporter_name({}) is None
    assert tracing.exporter_name({"OTEL_SERVICE_NAME": "x"}) is None
    assert tracing.exporter_name({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "h"}) is None
    assert tracing.exporter_name({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}) == "otlp"
    assert not tracing.configure({}) and tracing.tracer is None and tracing.trace_headers() is None
    queue = f"otel-off-{run_id}"  # nobody consumes it: the message stays in Redis
    _, traceparent = _traceparent()
    async with gateway_process(settings) as gateway:
        async with aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            request = pb.EnqueueRequest(task_name="demo.add", args=args(2, 3), queue=queue)
            await stub.Enqueue(request, metadata=(("traceparent", traceparent),))
        await gateway.stop()
    client = redis.Redis.from_url(settings.broker_url)
    try:
        messages = client.lrange(f"{settings.key_prefix}{queue}", 0, -1)
    finally:
        client.close()
    assert len(messages) == 1
    headers = json.loads(messages[0])["headers"]
    assert headers["task"] == "demo.add"
    assert "traceparent" not in headers and "tracestate" not in headers
