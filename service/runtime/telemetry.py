"""Prometheus metrics of one gateway process: tasks, the outbox, streams, the broker, the loop.

Off unless ``TASKGATE_METRICS_LISTEN`` is set: :data:`current` is then ``None`` and every hook
in the hot paths is one module-attribute read and a ``None`` check. ``enable()`` creates the
metrics in a registry of their own and serves ``/metrics`` from prometheus_client's HTTP
server, which runs on a thread of its own (a scrape never waits for the event loop, nor the
loop for a scrape).

Several processes on one host: each serves its own port (one ``TASKGATE_METRICS_LISTEN``
per process; Prometheus scrapes every one and sums over ``instance``). prometheus_client's
multiprocess mode is not used: it needs a shared directory and files per process.

Label values come only from bounded sets: task names from the catalog (anything else is
``other``), the states of ``TaskState``, gRPC codes. Task names and accept times are
remembered for the tasks this process enqueued (a bounded LRU, :data:`REMEMBERED`); a
state change of a task it does not remember (enqueued by another replica, or before a
restart) is counted under ``task_name="other"`` and without its queue time. A state is
counted once per task and state in this process, although the recorder and the state feed
both write it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.domain.model import TaskState, TaskUpdate

log = logging.getLogger(__name__)

#: Tasks whose name, accept time and last counted state one process remembers.
REMEMBERED = 100_000
#: The label of a task name outside the catalog.
OTHER = "other"
#: Seconds: buckets of the queue and run time histograms (10 ms to 1 hour).
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Seconds: buckets of the publish and loop-lag histograms (100 µs to 5 s).
FAST_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass(slots=True)
class _Seen:
    name: str
    accept_time: dt.datetime | None
    state: TaskState | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    run_observed: bool = False


class TaskMetrics:
    """The task, outbox, stream, broker and event-loop metrics of this process."""

    def __init__(self, registry: CollectorRegistry, task_names: Iterable[str]) -> None:
        self.registry = registry
        self._names = frozenset(task_names)
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        reg = registry
        self.enqueued = Counter(
            "taskgate_tasks_enqueued", "Tasks accepted (not deduplicated).", ["task_name"], registry=reg
        )
        self.transitions = Counter(
            "taskgate_task_transitions", "Task states recorded.", ["task_name", "state"], registry=reg
        )
        self.queue_seconds = Histogram(
            "taskgate_task_queue_seconds", "Accepted to started, seconds.", ["task_name"],
            buckets=TASK_BUCKETS, registry=reg,
        )  # fmt: skip
        self.run_seconds = Histogram(
            "taskgate_task_run_seconds", "Started to a terminal state, seconds.", ["task_name"],
            buckets=TASK_BUCKETS, registry=reg,
        )  # fmt: skip
        self.outbox_pending = Gauge(
            "taskgate_outbox_pending", "Tasks due and not yet handed to the broker.", registry=reg
        )
        self.held_tasks = Gauge(
            "taskgate_held_tasks", "Tasks held in the database until their run time.", registry=reg
        )
        self.queue_tasks = Gauge(
            "taskgate_queue_tasks",
            "Recorded unfinished tasks per queue and state (every replica "
            "reports the same database: take max).",
            ["queue", "state"],
            registry=reg,
        )
        self.streams_open = Gauge(
            "taskgate_streams_open", "Open StreamProgress and WaitTask calls.", registry=reg
        )
        self.publish_seconds = Histogram(
            "taskgate_broker_publish_seconds", "One publish of a batch to the broker, seconds.",
            buckets=FAST_BUCKETS, registry=reg,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "taskgate_event_loop_lag_seconds", "How late the event loop woke a timer, seconds.",
            buckets=FAST_BUCKETS, registry=reg,
        )  # fmt: skip

    def label(self, task_name: str) -> str:
        """``task_name`` if the catalog has it, else ``other`` (no new series)."""
        return task_name if task_name in self._names else OTHER

    def task_enqueued(self, task_id: str, task_name: str, accept_time: dt.datetime) -> None:
        """Count an accepted task and remember its name and accept time."""
        name = self.label(task_name)
        self.enqueued.labels(name).inc()
        self._remember(task_id, _Seen(name, accept_time))

    def _remember(self, task_id: str, seen: _Seen) -> None:
        self._seen[task_id] = seen
        if len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)

    def states_written(self, updates: Sequence[TaskUpdate]) -> None:
        """Count the states the recorder or the feed wrote: each task and state once, nothing
        after a terminal state (a late start only fills in the times)."""
        for update in updates:
            seen = self._seen.get(update.task_id)
            if seen is None:
                seen = _Seen(OTHER, None)
                self._remember(update.task_id, seen)
            if seen.state is None or (not seen.state.terminal and seen.state is not update.state):
                self.transitions.labels(seen.name, update.state.value).inc()
                seen.state = update.state
            self._observe_times(seen, update)

    def _observe_times(self, seen: _Seen, update: TaskUpdate) -> None:
        """Queue time once the start is known, run time once the start and the end are
        (the STARTED update may arrive after the terminal one)."""
        seen.start_time = seen.start_time or update.start_time
        if update.state.terminal:
            seen.end_time = seen.end_time or update.end_time
        start = seen.start_time
        if start is None:
            return
        if seen.accept_time is not None:
            self.queue_seconds.labels(seen.name).observe(max((start - seen.accept_time).total_seconds(), 0.0))
            seen.accept_time = None
        if seen.end_time is not None and not seen.run_observed:
            self.run_seconds.labels(seen.name).observe(max((seen.end_time - start).total_seconds(), 0.0))
            seen.run_observed = True

    def watch_streams(self, count: Callable[[], int]) -> None:
        """Read the open-stream count at each scrape."""
        self.streams_open.set_function(lambda: float(count()))


#: This process's metrics; None while metrics are off (every hook checks for that).
current: TaskMetrics | None = None


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` too) as (host, port).

    Raises:
        ValueError: not ``host:port`` with a numeric port.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"TASKGATE_METRICS_LISTEN={listen!r}: expected host:port, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)  # empty: every address


def enable(listen: str, task_names: Iterable[str]) -> tuple[TaskMetrics, int]:
    """Create this process's metrics and serve them on ``listen`` (path ``/metrics``).

    Returns:
        The metrics and the port bound (useful with port 0).
    """
    global current
    host, port = split_listen(listen)
    registry = CollectorRegistry(auto_describe=True)
    metrics = TaskMetrics(registry, task_names)
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    current = metrics
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return metrics, bound


def states_written(updates: Sequence[TaskUpdate]) -> None:
    """The recorder's and the feed's hook: count what they wrote (nothing while metrics are off)."""
    metrics = current
    if metrics is not None:
        metrics.states_written(updates)
