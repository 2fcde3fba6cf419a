"""Assembling and running the gRPC server: servicer, health, reflection, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from dataclasses import dataclass, field

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

from service.api.auth import Authenticator, AuthInterceptor, Security, StartupError, security_from_settings
from service.api.limits import ServiceLimits
from service.api.servicer import TaskServicer
from service.broker.outbox import Outbox
from service.broker.publisher import Publisher, publisher_for
from service.config import Settings
from service.domain.catalog import Catalog
from service.domain.errors import Unavailable
from service.results.hub import ProgressHub
from service.results.recorder import Recorder
from service.runtime.gcpolicy import GcPolicy
from service.runtime.loopwatch import LoopWatch
from service.store.migrate import check_current
from service.store.tasks import TaskStore
from service.usecases.tasks import Gateway, Limits
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskService"].full_name


def build_server(
    gateway: Gateway,
    health_servicer: health.aio.HealthServicer,
    listen: str,
    *,
    security: Security | None = None,
    limits: ServiceLimits | None = None,
) -> tuple[aio.Server, int]:
    """A gRPC server with TaskService, health and reflection, bound to ``listen``.

    Args:
        gateway: The use cases.
        health_servicer: The health service (kept up to date by the runtime).
        listen: host:port; port 0 picks a free one.
        security: Who may call and the TLS credentials; None = open mode, plaintext.
        limits: Request and stream limits; None = the defaults.

    Returns:
        The (not yet started) server and the port it bound (useful with port 0).
    """
    security = security or Security(Authenticator.open())
    limits = limits or ServiceLimits()
    # open mode needs no interceptor, and a server without one skips a coroutine per call
    interceptors = [] if security.authenticator.is_open else [AuthInterceptor(security.authenticator)]
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 1),
            # calls that arrived but are not yet handed to Python: gRPC core's defaults
            # (1,000, hard 3,000) cancel part of a reconnect storm of a full server's streams
            ("grpc.server.max_pending_requests", limits.max_streams),
            ("grpc.server.max_pending_requests_hard_limit", 3 * limits.max_streams),
        ],
    )
    servicer = TaskServicer(gateway, security.authenticator, limits)
    pb_grpc.add_TaskServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    names = (SERVICE_NAME, health_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if security.credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, security.credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port


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
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Connect, check the schema, and start the background loops.

        Raises:
            SchemaNotCurrent: the database needs ``taskgate migrate``.
        """
        store = TaskStore.connect(settings.database_url, pool_size=settings.db_pool_size)
        try:
            await check_current(store.engine)
        except BaseException:
            await store.close()
            raise
        publisher = publisher_for(settings)
        recorder = Recorder(store, reconcile_interval=settings.reconcile_interval)
        hub = ProgressHub(settings.result_backend, settings.task_meta_prefix, recorder.record)
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
        gateway = Gateway(store, _catalog(settings), outbox, hub, recorder, limits)
        runtime = cls(settings, store, publisher, hub, recorder, outbox, gateway)
        for name, coro in (
            ("hub", hub.run()),
            ("recorder", recorder.run()),
            ("reconcile", recorder.reconcile_loop(hub)),
            ("outbox", outbox.run()),
            ("health", runtime._health_loop()),
        ):
            runtime.background.append(asyncio.create_task(coro, name=f"taskgate-{name}"))
        return runtime

    async def check_health(self) -> bool:
        """True when the database, Redis and the broker all answer."""
        try:
            await self.store.ping()
            await self.hub.ping()
            await self.publisher.aping()
        except (Unavailable, RedisError, OSError) as exc:
            log.warning("health: NOT_SERVING (%s)", exc)
            return False
        return True

    async def _health_loop(self) -> None:
        statuses = health_pb2.HealthCheckResponse
        while True:
            status = statuses.SERVING if await self.check_health() else statuses.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)
            await asyncio.sleep(self.settings.health_interval)

    async def stop(self) -> None:
        """Stop the loops, write what is pending, and close every connection."""
        # cancelling the outbox mid-batch would leave published rows unmarked (and so
        # published again by the relay): let it finish the batch in hand instead
        self.outbox.request_stop()
        outbox_task = next(t for t in self.background if t.get_name() == "taskgate-outbox")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(outbox_task), 15)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.outbox.run_once()
        with contextlib.suppress(Exception):
            await self.recorder.flush()
        await self.hub.close()
        await self.publisher.aclose()
        await self.store.close()


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
    log.info("database %s", masked_url(settings.database_url))
    runtime = await Runtime.start(settings)
    watch = LoopWatch()  # stopped with the runtime's other background tasks
    runtime.background.append(asyncio.create_task(watch.run(), name="taskgate-loopwatch"))
    collector = GcPolicy(settings.gc_policy, quiet=lambda: runtime.hub.watcher_count == 0)
    runtime.background.append(asyncio.create_task(collector.run(), name="taskgate-gc"))
    try:
        server, port = build_server(
            runtime.gateway,
            runtime.health,
            settings.listen,
            security=security,
            limits=ServiceLimits.from_settings(settings),
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
