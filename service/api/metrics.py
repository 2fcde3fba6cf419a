"""gRPC server metrics under go-grpc-prometheus's names, counted at the error boundary.

``grpc_server_started_total``, ``grpc_server_handled_total`` (with ``grpc_code``),
``grpc_server_handling_seconds`` and ``grpc_server_msg_sent_total``, each labelled
``grpc_service``, ``grpc_method``, ``grpc_type``: the names existing Grafana dashboards for
Go services query. They are counted by :func:`service.api.status.grpc_errors`, which every
servicer method already passes through and which already knows the status code of an
error, instead of by a server interceptor: an interceptor costs a coroutine and a handler
wrapper per call and sees the code only after the fact. Off (``current is None``, the
default) the boundary pays one attribute read per call. Health and reflection calls are not
counted (they do not pass the boundary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

#: Seconds: go-grpc-prometheus's default histogram buckets (prometheus.DefBuckets).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LABELS = ("grpc_service", "grpc_method", "grpc_type")


class _Method:
    """One method's labelled series, looked up once (``labels()`` costs a lock and a dict
    lookup per call: four per call were most of the metrics' cost on Enqueue)."""

    __slots__ = ("handled", "labels", "metrics", "msg_sent", "seconds", "started")

    def __init__(self, metrics: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels)
        self.msg_sent = metrics.msg_sent.labels(*labels)
        #: by status code name, filled as codes occur
        self.handled: dict[str, Any] = {}

    def handled_with(self, code: str) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = self.metrics.handled.labels(*self.labels, code)
        return child


@dataclass(slots=True)
class Call:
    """One call being measured."""

    method: _Method
    start: float

    def sent(self) -> None:
        """Count one message sent on a stream."""
        self.method.msg_sent.inc()

    def done(self, code: str) -> None:
        """Count the call as handled with ``code`` (a ``grpc.StatusCode`` name)."""
        self.method.handled_with(code).inc()
        self.method.seconds.observe(time.perf_counter() - self.start)


class RpcMetrics:
    """The gRPC server metrics of this process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", _LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by code.", (*_LABELS, "grpc_code"),
            registry=registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, seconds.", _LABELS,
            buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server.", _LABELS, registry=registry
        )
        self._methods: dict[tuple[type, str], _Method] = {}

    def start(self, servicer: object, method: str, kind: str) -> Call:
        """Count a call of ``servicer.method`` as started and start its clock."""
        key = (type(servicer), method)
        series = self._methods.get(key)
        if series is None:
            series = self._methods[key] = _Method(self, (service_name(type(servicer)), method, kind))
        series.started.inc()
        return Call(series, time.perf_counter())


def service_name(servicer: type) -> str:
    """The full gRPC service name a servicer class implements (``taskgate.v1.TaskService``).

    The generated base class (``XServicer`` in a ``*_pb2_grpc`` module) names the service;
    the generated modules live at the proto package's path (``taskgate/v1/``).
    """
    for klass in servicer.__mro__:
        module = klass.__module__
        if module.endswith("_pb2_grpc") and klass.__name__.endswith("Servicer"):
            package = module.rsplit(".", 1)[0]
            return f"{package}.{klass.__name__.removesuffix('Servicer')}"
    return servicer.__name__


def code_of(context: Any) -> str:
    """The status code a context was aborted with (``UNKNOWN`` if it cannot tell)."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "UNKNOWN"


#: This process's gRPC metrics; None while metrics are off.
current: RpcMetrics | None = None


def enable(registry: CollectorRegistry) -> RpcMetrics:
    """Create the gRPC metrics in ``registry`` and switch counting on."""
    global current
    current = RpcMetrics(registry)
    return current
