"""Trace context of schedule firings.

A slot's firing has no caller: no RPC is in flight when the ``schedules`` loop decides it.
Each firing therefore starts a **new trace**: one root PRODUCER span, ``schedule fire``,
with the ``taskgate.schedule_id``, ``taskgate.slot`` and ``taskgate.task_id`` attributes,
whose W3C context becomes the task's ``traceparent``/``tracestate`` message headers (as
Enqueue's does: kept in the row, republished by the outbox, continued by the worker's
Celery instrumentation). One trace per firing, not one per schedule: a schedule lives for
months, and a trace that never ends (the CreateSchedule call's, with a child per firing)
is one no backend keeps or shows usefully. The schedule_id attribute ties the firings of a
schedule together instead.

TriggerSchedule is a call: its firing continues the caller's trace
(``service.runtime.tracing.trace_headers``), as Enqueue does.

While tracing is off, ``firing_headers`` costs one attribute read and returns None.
"""

from __future__ import annotations

import datetime as dt

from opentelemetry import context, propagate, trace

from service.runtime import tracing

#: The root span of every firing.
SPAN_NAME = "schedule fire"


def firing_headers(schedule_id: str, slot: dt.datetime, task_id: str) -> dict[str, str] | None:
    """The message headers of a new trace for the firing of ``slot`` (None: tracing off)."""
    active = tracing.tracer
    if active is None:
        return None
    span = active.start_span(
        SPAN_NAME,
        context=context.Context(),  # a root: not a child of whatever is current
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "taskgate.schedule_id": schedule_id,
            "taskgate.slot": slot.isoformat(),
            "taskgate.task_id": task_id,
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    span.end()
    return {key: carrier[key] for key in ("traceparent", "tracestate") if carrier.get(key)} or None


__all__ = ["SPAN_NAME", "firing_headers"]
