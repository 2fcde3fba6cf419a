"""The composition root: settings → adapters → use cases → gRPC server, and the loops they run.

Nothing else wires layers together. ``Runtime.start`` builds the adapters (store, publisher,
shared subscription, recorder, outbox), the use cases on top of them and every background
loop (run by one :class:`~service.runtime.supervise.Supervisor`); ``serve`` adds the gRPC
server and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import signal
import socket
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2
from sqlalchemy.engine import make_url

from service.api import metrics as rpc_metrics
from service.api.auth import StartupError, security_from_settings
from service.api.health import HealthServicer
from service.api.limits import ServiceLimits
from service.api.server import SERVICE_NAME, build_server
from service.broker.canvas import CanvasCapture
from service.broker.control import CancelSignals
from service.broker.fleet import WorkerInspector, queue_depths
from service.broker.inspect import BrokerInspector
from service.broker.outbox import Outbox
from service.broker.publisher import Publisher, publisher_for, send_only_app
from service.config import Settings
from service.domain.catalog import Catalog
from service.results.chords import BackendWriter
from service.results.feed import StateFeed
from service.results.hub import ProgressHub
from service.results.recorder import Recorder
from service.results.recovery import ResultKeys
from service.runtime import telemetry
from service.runtime.gcpolicy import GcPolicy
from service.runtime.loopwatch import LoopWatch
from service.runtime.supervise import Backoff, Supervisor
from service.store.adoption import AdoptionStore
from service.store.cancel import CancelStore
from service.store.listing import TaskListing
from service.store.migrate import check_current
from service.store.operations import OperationsStore
from service.store.recovery import RecoveryStore
from service.store.schedules import ScheduleStore
from service.store.tasks import TaskStore
from service.store.workflows import WorkflowStore
from service.usecases.control import Control
from service.usecases.operations import Operations
from service.usecases.recovery import Recovery, RecoverySettings
from service.usecases.schedules import Schedules
from service.usecases.tasks import Gateway, Limits
from service.usecases.workflows import Workflows

log = logging.getLogger(__name__)


def _catalog(settings: Settings) -> Catalog:
    if settings.task_names:
        return Catalog.from_names(settings.task_names)
    return Catalog.from_app(settings.workers_app)


@dataclass
class Runtime:
    """Everything a running gateway owns, started and stopped together."""

    settings: Settings
    store: TaskStore
    publisher: Publisher
    hub: ProgressHub
    recorder: Recorder
    outbox: Outbox
    gateway: Gateway
    health: HealthServicer = field(default_factory=HealthServicer)
    loops: Supervisor = field(default_factory=Supervisor)
    #: the task names and signatures every use case checks against (built once)
    catalog: Catalog = field(default_factory=lambda: Catalog.from_names([]))
    feed: StateFeed | None = None
    recovery: Recovery | None = None
    operations: Operations | None = None
    schedules: Schedules | None = None
    workflows: Workflows | None = None
    chord_writer: BackendWriter | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Connect, check the schema, and start the background loops.

        Raises:
            SchemaNotCurrent: the database needs ``taskgate migrate``.
        """
        store = TaskStore.connect(
            settings.database_url, pool_size=settings.db_pool_size, pgbouncer=settings.db_pgbouncer
        )
        try:
            await check_current(store.engine)
        except BaseException:
            await store.close()
            raise
        publisher = publisher_for(settings, queue_max_priority=settings.queue_max_priority or None)
        adoption = AdoptionStore(store.engine) if settings.adopt_foreign else None
        recorder = Recorder(
            store, reconcile_interval=settings.reconcile_interval, adoption=adoption, feed=settings.state_feed
        )
        # with the state feed on, pub/sub updates the feed also carries are left to it
        # (``Recorder.record_published``; see service/results/feed.py)
        on_update = recorder.record_published if settings.state_feed else recorder.record
        hub = ProgressHub(settings.result_backend, settings.task_meta_prefix, on_update)
        hub.on_resubscribe(recorder.request_reconcile)
        outbox = Outbox(
            store,
            publisher,
            lease=dt.timedelta(seconds=settings.publish_lease),
            poll_interval=settings.outbox_poll_interval,
        )
        limits = Limits(
            schedule_horizon=dt.timedelta(seconds=settings.schedule_horizon),
            max_schedule=dt.timedelta(seconds=settings.max_schedule),
        )
        catalog = _catalog(settings)
        gateway = Gateway(store, catalog, outbox, hub, recorder, limits)
        signals = CancelSignals.from_settings(settings, send_only_app(settings))
        gateway.control = Control(
            gateway, TaskListing(store.engine), CancelStore(store.engine), signals, hub, recorder
        )
        runtime = cls(settings, store, publisher, hub, recorder, outbox, gateway, catalog=catalog)
        runtime._start_loops()
        return runtime

    def _start_loops(self) -> None:
        loops, recorder = self.loops, self.recorder
        loops.start("hub", self.hub.listen)
        loops.start("recorder", recorder.step, backoff=Backoff(first=0.5))
        loops.start("reconcile", lambda: recorder.reconcile_step(self.hub), backoff=Backoff(first=1.0))
        outbox = self.outbox
        loops.start("outbox", outbox.run, backoff=Backoff(first=1.0), until=lambda: outbox.stopping)
        loops.start("health", self._health_step)
        if self.settings.state_feed:
            self._start_feed()
        self._start_recovery()
        self._start_operations()
        self._start_schedules()
        self._start_workflows()

    def _start_feed(self) -> None:
        settings = self.settings
        self.feed = StateFeed(
            settings.result_backend,
            settings.keys.state_feed,
            self.store,
            self.hub,
            claim_idle=settings.state_feed_claim_idle,
            adoption=AdoptionStore(self.store.engine) if settings.adopt_foreign else None,
            on_read=self.recorder.fed,
        )
        self.loops.start("feed", self.feed.step, backoff=Backoff(first=0.5))

    def _start_recovery(self) -> None:
        settings = self.settings
        self.recovery = Recovery(
            RecoveryStore(self.store.engine),
            ResultKeys.from_settings(settings),
            BrokerInspector.from_settings(settings),
            self.catalog,
            RecoverySettings(
                interval=settings.recovery_interval,
                lost_timeout=settings.worker_lost_timeout,
                lost_after=settings.lost_queued_after,
            ),
        )
        self.loops.start("recovery", self.recovery.step, backoff=Backoff(first=1.0))

    def _start_operations(self) -> None:
        settings = self.settings
        inspector = WorkerInspector(send_only_app(settings))
        self.operations = Operations(
            OperationsStore(self.store.engine),
            queue_depths(settings),
            inspector,
            retention=settings.retention,
        )
        self.loops.start("retention", self.operations.retention_step, backoff=Backoff(first=5.0, cap=60.0))
        self.loops.start("gauges", self.operations.gauge_step, backoff=Backoff(first=5.0, cap=60.0))

    def _start_schedules(self) -> None:
        settings = self.settings
        store = ScheduleStore(self.store.engine)
        self.schedules = Schedules(
            store,
            self.catalog,
            self.outbox,
            poll_interval=settings.schedule_poll_interval,
            control=self.gateway.control,
        )
        self.loops.start("schedules", self.schedules.step, backoff=Backoff(first=0.5))

    def _start_workflows(self) -> None:
        settings = self.settings
        self.chord_writer = BackendWriter.from_settings(settings)
        self.workflows = Workflows(
            WorkflowStore(self.store.engine),
            self.catalog,
            self.outbox,
            CanvasCapture(settings),
            self.chord_writer,
            self.gateway.control,
            max_tasks=settings.max_batch,
            hub=self.hub,
        )
        self.loops.start("workflows", self.workflows.step, backoff=Backoff(first=0.5))

    def start_metrics(self) -> int:
        """Serve this process's metrics on TASKGATE_METRICS_LISTEN; returns the port."""
        metrics, port = telemetry.enable(self.settings.metrics_listen, self.catalog.names)
        rpc_metrics.enable(metrics.registry)
        metrics.watch_streams(lambda: self.hub.watcher_count)
        return port

    async def check_health(self) -> bool:
        """True when the database, Redis and the broker all answer; any failure is logged."""
        try:
            await self.store.ping()
            await self.hub.ping()
            await self.publisher.aping()
        except Exception as exc:  # noqa: BLE001 - any failure means NOT_SERVING, never a dead loop
            log.warning("health: NOT_SERVING (%s: %s)", type(exc).__name__, exc)
            return False
        return True

    async def _health_step(self) -> float:
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if await self.check_health() else statuses.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        return self.settings.health_interval

    async def stop(self) -> None:
        """Stop the loops, write what is pending, and close every connection."""
        # cancelling the outbox mid-batch would leave published rows unmarked (and so
        # published again by the relay): let it finish the batch in hand instead
        self.outbox.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.loops.task("outbox")), 15)
        await self.loops.stop()
        if self.schedules is not None:
            # slots decided ahead and held here: left to the relay of any replica, at their slot
            with contextlib.suppress(Exception):
                await self.schedules.release()
        with contextlib.suppress(Exception):
            await self.outbox.run_once()
        with contextlib.suppress(Exception):
            await self.recorder.flush()
        await self.hub.close()
        if self.feed is not None:
            await self.feed.close()
        if self.recovery is not None:
            await self.recovery.aclose()
        await self.publisher.aclose()
        if self.chord_writer is not None:
            await self.chord_writer.aclose()
        if self.gateway.control is not None:
            await self.gateway.control.aclose()
        if self.operations is not None:
            await self.operations.aclose()
        await self.store.close()


def ensure_port_free(listen: str) -> None:
    """Raise OSError ("cannot listen on …") when another process listens on ``listen``.

    gRPC binds only once everything else is up; without SO_REUSEPORT a port in use is
    certain to fail then, so say it at once. Port 0 (any free port) is never in use.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # an unresolvable host is for the gRPC server to report
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(
                        f"cannot listen on {listen} (address in use? "
                        "TASKGATE_REUSE_PORT=1 lets replicas share a port)"
                    ) from exc


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and messages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show nothing of it
        return "<unparsable URL>"


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then stop gracefully.

    Exits with status 2 (SystemExit) when the security settings are unusable: a malformed
    auth file, unreadable TLS files, or open mode on a non-loopback address. They are checked
    before connecting anywhere; the log line names the file and the problem.
    """
    try:
        security = security_from_settings(settings)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    if not settings.reuse_port:
        ensure_port_free(settings.listen)  # fail fast, before connecting anywhere
    log.info("database %s", masked_url(settings.database_url))
    runtime = await Runtime.start(settings)
    if settings.metrics_listen:
        runtime.start_metrics()
    watch = LoopWatch(idle_interval=0.05)  # stopped with the runtime's other loops
    collector = GcPolicy(settings.gc_policy, quiet=lambda: runtime.hub.watcher_count == 0)
    runtime.loops.start("loopwatch", watch.run)
    runtime.loops.start("gc", collector.run)
    try:
        server, port = build_server(
            runtime.gateway,
            runtime.health,
            settings.listen,
            security=security,
            limits=ServiceLimits.from_settings(settings),
            reuse_port=settings.reuse_port,
            operations=runtime.operations,
            schedules=runtime.schedules,
            workflows=runtime.workflows,
        )
    except BaseException:
        await runtime.stop()
        raise
    await server.start()
    host = settings.listen.rsplit(":", 1)[0]
    scheme = "TLS" if security.credentials is not None else "plaintext"
    log.info("taskgate listening on %s:%d (%s)", host, port, scheme)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, watch.log_report)  # event-loop stall stats to the log
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: in-flight calls get %.0fs", settings.shutdown_grace)
        await runtime.health.enter_graceful_shutdown()
        runtime.hub.begin_shutdown()
        await server.stop(settings.shutdown_grace)
        await runtime.stop()
        log.info("stopped")
