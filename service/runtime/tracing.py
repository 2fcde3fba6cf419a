"""OpenTelemetry tracing of the gateway, configured only by the standard ``OTEL_*`` variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` (or ``console``), or, with it unset,
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set.
Nothing set (or ``OTEL_TRACES_EXPORTER=none``, or ``OTEL_SDK_DISABLED=true``): no tracing,
and every hook here costs one attribute read. The exporter speaks OTLP over HTTP/protobuf
(``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``, the default; other protocols are refused
with a log line and tracing stays off); the endpoint, headers and timeouts are the
exporter's own ``OTEL_EXPORTER_OTLP_*`` variables; the service name ``OTEL_SERVICE_NAME``
(default ``taskgate``); the batching ``OTEL_BSP_*``.

What is traced:

- every RPC: one SERVER span (``taskgate.v1.TaskService/Enqueue``) continuing the caller's
  ``traceparent``/``tracestate`` metadata (``server_span``, entered by
  ``service/api/status.py``'s ``grpc_errors``);
- the task: ``trace_headers()`` is the W3C context the gateway writes as top-level Celery
  message headers (``traceparent``, ``tracestate``), kept in the row so that the outbox's
  later publishes carry it too; ``opentelemetry-instrumentation-celery`` in the worker
  (``taskgate/worker/tracing.py``) continues the trace from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

#: The service name when OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) gives none.
DEFAULT_SERVICE_NAME = "taskgate"
#: The protocols the installed exporter speaks.
SUPPORTED_PROTOCOLS = ("http/protobuf",)

#: The gateway's tracer; None while tracing is off.
tracer: trace.Tracer | None = None
_provider: Any = None


def exporter_name(environ: Mapping[str, str]) -> str | None:
    """The exporter the variables ask for (``otlp``, ``console``), or None for no tracing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names:
        return None if names[0] == "none" else names[0]
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return "otlp" if endpoint else None


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    """The span exporter ``name`` stands for; None (logged) when it cannot be made."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.error("tracing off: OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol not in SUPPORTED_PROTOCOLS:
        log.error("tracing off: OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (http/protobuf)", protocol)
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def configure(environ: Mapping[str, str] | None = None, *, service_name: str = DEFAULT_SERVICE_NAME) -> bool:
    """Set up the SDK (global tracer provider, batch exporter) when the variables ask for it.

    Returns:
        True when tracing is on.
    """
    global tracer, _provider
    env = os.environ if environ is None else environ
    name = exporter_name(env)
    exporter = None if name is None else _exporter(name, env)
    if exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("taskgate")
    log.info("tracing on: %s exporter", name)
    return True


def shutdown() -> None:
    """Export what is buffered and stop tracing (no-op while off)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer, _provider = None, None


def _carrier(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


@contextlib.contextmanager
def server_span(service: str, method: str, context: Any) -> Iterator[None]:
    """One SERVER span around an RPC, child of the caller's ``traceparent`` (if any), current
    inside the block; ERROR when the call ends with another status than OK."""
    active = tracer
    if active is None:
        yield
        return
    parent = propagate.extract(_carrier(context.invocation_metadata()))
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    with active.start_as_current_span(
        f"{service}/{method}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except BaseException as exc:
            _end(span, context, exc)
            raise
        _end(span, context, None)


def _end(span: trace.Span, context: Any, exc: BaseException | None) -> None:
    code = None
    with contextlib.suppress(Exception):
        code = context.code()
    if code is None and exc is None:
        return
    name = getattr(code, "name", "UNKNOWN" if exc is not None else "OK")
    span.set_attribute("rpc.grpc.status_code", int(code.value[0]) if code is not None else 2)
    if name != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, name))


def trace_headers() -> dict[str, str] | None:
    """The current trace context as Celery message headers (``traceparent``, ``tracestate``);
    None while tracing is off or no span is active."""
    if tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key: carrier[key] for key in ("traceparent", "tracestate") if carrier.get(key)} or None


__all__ = ["configure", "exporter_name", "server_span", "shutdown", "trace_headers"]
