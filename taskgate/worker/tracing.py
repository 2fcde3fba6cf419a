"""Tracing of a Celery worker through the standard ``OTEL_*`` variables (``configure(app)`` calls
``install()``).

When the variables ask for tracing (as for the gateway: ``OTEL_TRACES_EXPORTER=otlp`` or
``console``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``; not ``OTEL_SDK_DISABLED=true``),
each process that runs tasks sets up the OpenTelemetry SDK (a batch OTLP/HTTP-protobuf
exporter, service name ``OTEL_SERVICE_NAME`` or ``taskgate-worker``) and
``opentelemetry-instrumentation-celery``: prefork children in ``worker_process_init`` (so each
child exports from its own threads), the worker itself in ``worker_init`` for the solo, thread
and gevent pools. Each task is then a span continuing the ``traceparent`` message header the
gateway wrote, so one trace runs caller → gateway → worker. Buffered spans are exported when
the process shuts down. Nothing set: nothing is imported, connected or exported.

Needs ``opentelemetry-sdk``, ``opentelemetry-exporter-otlp-proto-http`` and
``opentelemetry-instrumentation-celery`` in the worker's environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: The service name when OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) gives none.
DEFAULT_SERVICE_NAME = "taskgate-worker"

_installed = False
_provider: Any = None


def requested(environ: Mapping[str, str]) -> bool:
    """True when the ``OTEL_*`` variables ask for tracing with OTLP (or the console)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names:
        return names[0] in ("otlp", "console")
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def install() -> bool:
    """Connect the worker signals that start tracing, when the variables ask for it (once per
    process). Returns True when connected."""
    global _installed
    if _installed or not requested(os.environ):
        return _installed
    from celery import signals

    signals.worker_process_init.connect(_child_started, weak=False)
    signals.worker_init.connect(_worker_started, weak=False)
    signals.worker_process_shutdown.connect(_stopping, weak=False)
    signals.worker_shutdown.connect(_stopping, weak=False)
    _installed = True
    return True


def _child_started(**_: Any) -> None:
    start()


def _worker_started(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool_cls", None)
    where = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', pool)}"
    if "prefork" not in where:  # prefork: its children start tracing (after the fork)
        start()


def _stopping(**_: Any) -> None:
    global _provider
    if _provider is not None:
        _provider.shutdown()  # exports what is buffered
        _provider = None


def start() -> None:
    """Set up the SDK and instrument Celery in this process (idempotent)."""
    global _provider
    if _provider is not None:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env = os.environ
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})
    )
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _provider = provider
    log.info("tracing on (pid %d)", os.getpid())


def _exporter() -> Any:
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower().startswith("console"):
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


__all__ = ["install", "requested", "start"]
