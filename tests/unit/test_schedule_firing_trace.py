"""Schedule firings: the fingerprint shortcut gives Enqueue's digest, and each firing starts
its own trace (a root span whose context becomes the message's traceparent)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.domain.model import TaskSpec
from service.domain.schedule import TaskTemplate, firing_fingerprint
from service.runtime import schedule_tracing, tracing

SLOT = dt.datetime(2025, 3, 30, 1, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "template",
    [
        TaskTemplate("demo.add", args=[1, 2]),
        TaskTemplate("demo.add", kwargs={"x": [1, {"é": None}]}, queue="q", priority=3, headers={"h": "v"}),
        TaskTemplate("demo.sleep", args=[1.5], time_limit=10, soft_time_limit=5, expire_after=30),
    ],
)
def test_firing_fingerprint_is_the_enqueue_digest(template: TaskTemplate) -> None:
    spec: TaskSpec = template.spec(SLOT, "schedule:x:1:2")
    assert firing_fingerprint(spec) == spec.fingerprint()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def test_no_trace_headers_while_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "tracer", None)
    assert schedule_tracing.firing_headers("nightly", SLOT, "t-1") is None


def test_each_firing_is_the_root_of_its_own_trace(spans: InMemorySpanExporter) -> None:
    assert tracing.tracer is not None
    with tracing.tracer.start_as_current_span("some call") as call:
        first = schedule_tracing.firing_headers("nightly", SLOT, "t-1")
    second = schedule_tracing.firing_headers("nightly", SLOT + dt.timedelta(days=1), "t-2")
    assert first is not None and second is not None
    first_trace, second_trace = (headers["traceparent"].split("-")[1] for headers in (first, second))
    assert first_trace != second_trace
    assert first_trace != format(call.get_span_context().trace_id, "032x"), "not a child of the current call"
    fired = [span for span in spans.get_finished_spans() if span.name == schedule_tracing.SPAN_NAME]
    assert len(fired) == 2
    assert all(span.parent is None for span in fired)
    assert fired[0].attributes == {
        "taskgate.schedule_id": "nightly",
        "taskgate.slot": SLOT.isoformat(),
        "taskgate.task_id": "t-1",
    }
    assert first["traceparent"].split("-")[2] == format(fired[0].context.span_id, "016x")
