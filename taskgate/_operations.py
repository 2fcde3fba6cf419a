"""OperationsService for the clients: ``QueueInfo``, ``WorkerInfo`` and the ``list_queues`` /
``list_workers`` methods ``AsyncClient`` and ``Client`` get from the two mixins here.

Both calls need a caller with ``read_all`` (PermissionDenied otherwise).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import grpc
from grpc import aio

from taskgate.errors import rpc_errors as _rpc_errors
from taskgate.v1 import operations_service_pb2 as opb
from taskgate.v1 import operations_service_pb2_grpc as opb_grpc


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One queue: messages in the broker and recorded unfinished tasks (see ``QueueInfo``)."""

    name: str
    broker_messages: int
    queued: int
    scheduled: int
    running: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker that answered Celery's remote control (see ``WorkerInfo``)."""

    hostname: str
    queues: tuple[str, ...]
    active_task_ids: tuple[str, ...]
    processed: int
    #: Pool size; 0 when the worker did not say.
    concurrency: int
    last_seen_time: dt.datetime | None


def queues_from_proto(response: opb.ListQueuesResponse) -> list[QueueInfo]:
    """ListQueuesResponse as ``QueueInfo`` values, in the server's (name) order."""
    return [QueueInfo(q.name, q.broker_messages, q.queued, q.scheduled, q.running) for q in response.queues]


def workers_from_proto(response: opb.ListWorkersResponse) -> list[WorkerInfo]:
    """ListWorkersResponse as ``WorkerInfo`` values, in the server's (hostname) order."""
    return [
        WorkerInfo(
            hostname=w.hostname,
            queues=tuple(w.queues),
            active_task_ids=tuple(w.active_task_ids),
            processed=w.processed,
            concurrency=w.concurrency,
            last_seen_time=w.last_seen_time.ToDatetime(tzinfo=dt.UTC)
            if w.HasField("last_seen_time")
            else None,
        )
        for w in response.workers
    ]


class AsyncOperations:
    """OperationsService on ``AsyncClient``."""

    _channel: aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _operations(self) -> opb_grpc.OperationsServiceAsyncStub:
        return opb_grpc.OperationsServiceStub(self._channel)

    async def list_queues(self) -> list[QueueInfo]:
        """Every queue with recorded unfinished tasks or broker messages, by name.

        Raises:
            PermissionDenied: the caller lacks read_all.
            Unavailable: the database or the broker is down.
        """
        with _rpc_errors():
            response = await self._operations.ListQueues(
                opb.ListQueuesRequest(), timeout=self._timeout, metadata=self._metadata
            )
        return queues_from_proto(response)

    async def list_workers(self) -> list[WorkerInfo]:
        """The workers answering Celery's remote control now (empty when none does).

        Raises:
            PermissionDenied: the caller lacks read_all.
            Unavailable: the broker is down.
        """
        with _rpc_errors():
            response = await self._operations.ListWorkers(
                opb.ListWorkersRequest(), timeout=self._timeout, metadata=self._metadata
            )
        return workers_from_proto(response)


class Operations:
    """OperationsService on ``Client`` (blocking)."""

    _channel: grpc.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _operations(self) -> opb_grpc.OperationsServiceStub:
        return opb_grpc.OperationsServiceStub(self._channel)

    def list_queues(self) -> list[QueueInfo]:
        """As ``AsyncClient.list_queues``."""
        with _rpc_errors():
            response = self._operations.ListQueues(
                opb.ListQueuesRequest(), timeout=self._timeout, metadata=self._metadata
            )
        return queues_from_proto(response)

    def list_workers(self) -> list[WorkerInfo]:
        """As ``AsyncClient.list_workers``."""
        with _rpc_errors():
            response = self._operations.ListWorkers(
                opb.ListWorkersRequest(), timeout=self._timeout, metadata=self._metadata
            )
        return workers_from_proto(response)


__all__ = ["AsyncOperations", "Operations", "QueueInfo", "WorkerInfo"]
