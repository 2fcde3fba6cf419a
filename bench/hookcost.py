"""What the metrics and tracing hooks of one Enqueue cost, timed in this process.

The gateway's own rounds (``bench/operations.py``) answer the question end to end, but on a
shared machine their spread is wider than the 5% they should resolve. This times exactly
the code that metrics and tracing add to an Enqueue, in a loop, with the gateway's own
objects:

- metrics: ``RpcMetrics.start`` and ``Call.done`` (the error boundary), ``task_enqueued``
  (the use case), one ``publish_seconds`` observation (per publish batch in the gateway:
  counted here per call, an upper bound);
- tracing: ``server_span`` continuing a caller's ``traceparent`` and ``trace_headers()`` (the
  Celery headers), ended by a batch span processor whose exporter encodes each batch as
  the OTLP exporter does (``encode_spans``) and drops it: the HTTP post is left out.

Process CPU time (every thread: the batch processor's export thread included) per call.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from service.api.metrics import RpcMetrics
from service.runtime import tracing
from service.runtime.telemetry import TaskMetrics
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

#: Spans ended between two flushes (the batch processor's queue holds 2,048; more are dropped).
_FLUSH_EVERY = 512
_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class HookCosts:
    """CPU microseconds per Enqueue."""

    calls: int
    metrics_us: float
    tracing_us: float


class _Context:
    """The part of a grpc.aio servicer context the hooks read."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", _TRACEPARENT),)

    def code(self) -> Any:
        return None


class _EncodingExporter(SpanExporter):
    """Encodes every batch as the OTLP/HTTP exporter does, then drops it."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _Servicer(pb_grpc.TaskServiceServicer):
    pass


def _metrics_us(calls: int) -> float:
    registry = CollectorRegistry()
    tasks = TaskMetrics(registry, ["demo.add"])
    rpc = RpcMetrics(registry)
    servicer = _Servicer()  # type: ignore[abstract]  # the stubs' methods; only its type is read
    ids = [f"task-{i}" for i in range(calls)]
    now = dt.datetime.now(dt.UTC)
    started = time.process_time()
    for task_id in ids:
        call = rpc.start(servicer, "Enqueue", "unary")
        tasks.task_enqueued(task_id, "demo.add", now)
        tasks.publish_seconds.observe(0.001)
        call.done("OK")
    return (time.process_time() - started) * 1e6 / calls


def _tracing_us(calls: int) -> float:
    exporter = _EncodingExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "taskgate-bench"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    saved = tracing.tracer
    tracing.tracer = provider.get_tracer("taskgate")
    context = _Context()
    try:
        started = time.process_time()
        for i in range(calls):
            with tracing.server_span("taskgate.v1.TaskService", "Enqueue", context):
                tracing.trace_headers()
            if i % _FLUSH_EVERY == _FLUSH_EVERY - 1:
                provider.force_flush()
        provider.force_flush()
        spent = time.process_time() - started
    finally:
        tracing.tracer = saved
        provider.shutdown()
    if exporter.spans != calls:
        raise RuntimeError(f"{exporter.spans} spans exported of {calls}: the queue dropped some")
    return spent * 1e6 / calls


def hook_costs(calls: int = 20_000) -> HookCosts:
    """Time ``calls`` Enqueues' worth of each hook (median of three runs)."""
    metrics = sorted(_metrics_us(calls) for _ in range(3))[1]
    traced = sorted(_tracing_us(calls) for _ in range(3))[1]
    return HookCosts(calls, metrics, traced)
