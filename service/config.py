"""Settings, read once from the environment at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from taskgate.worker.contract import CelerySettings


def _env(name: str, field: str) -> AliasChoices:
    return AliasChoices(name, field)


class Settings(CelerySettings):
    """Everything the gateway reads from the environment (plus the Celery settings)."""

    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/taskgate",
        validation_alias=_env("DATABASE_URL", "database_url"),
    )
    #: host:port the gRPC server listens on; port 0 picks a free one.
    listen: str = Field("127.0.0.1:50051", validation_alias=_env("TASKGATE_LISTEN", "listen"))
    #: Let several processes listen on the same port (SO_REUSEPORT), for deliberate replicas
    #: on one host. Off: a second server on a port in use fails with "address in use".
    reuse_port: bool = Field(False, validation_alias=_env("TASKGATE_REUSE_PORT", "reuse_port"))
    #: Comma-separated task names to accept instead of the workers app's tasks.
    tasks: str = Field("", validation_alias=_env("TASKGATE_TASKS", "tasks"))
    #: The Celery app (``module:attribute``) whose registered tasks form the catalog.
    workers_app: str = Field("workers:app", validation_alias=_env("TASKGATE_WORKERS_APP", "workers_app"))
    #: Seconds: EnqueueAt tasks due later than this stay in the database until shortly before.
    schedule_horizon: float = Field(
        300.0, gt=0, validation_alias=_env("TASKGATE_SCHEDULE_HORIZON", "schedule_horizon")
    )
    #: Seconds: how far ahead a run_time may be (365 days by default).
    max_schedule: float = Field(
        365 * 86400.0, gt=0, validation_alias=_env("TASKGATE_MAX_SCHEDULE", "max_schedule")
    )
    #: Seconds between polls of the outbox for due or unpublished tasks.
    outbox_poll_interval: float = Field(
        0.5, gt=0, validation_alias=_env("TASKGATE_OUTBOX_POLL_INTERVAL", "outbox_poll_interval")
    )
    #: Seconds between polls for due schedule slots (the longest a firing waits past its
    #: slot while nothing else is due); default 0.5.
    schedule_poll_interval: float = Field(
        0.5, gt=0, validation_alias=_env("TASKGATE_SCHEDULE_POLL_INTERVAL", "schedule_poll_interval")
    )
    #: Seconds a publisher's claim on an outbox row keeps other replicas off it.
    publish_lease: float = Field(30.0, gt=0, validation_alias=_env("TASKGATE_PUBLISH_LEASE", "publish_lease"))
    #: Seconds between reconcile passes that re-read unfinished tasks from Redis.
    reconcile_interval: float = Field(
        30.0, gt=0, validation_alias=_env("TASKGATE_RECONCILE_INTERVAL", "reconcile_interval")
    )
    #: Consume the workers' durable state feed (a Redis Stream; see service/results/feed.py).
    #: Default on; off leaves pub/sub and the reconcile (results expire, so states can be lost).
    state_feed: bool = Field(True, validation_alias=_env("TASKGATE_STATE_FEED", "state_feed"))
    #: Seconds an entry of the state feed read by a gateway may stay unacknowledged before
    #: another gateway takes it over (that one died, or is stuck). Default 60.
    state_feed_claim_idle: float = Field(
        60.0, gt=0, validation_alias=_env("TASKGATE_STATE_FEED_CLAIM_IDLE", "state_feed_claim_idle")
    )
    #: Seconds between recovery passes (tasks lost with their worker or by the broker);
    #: default 15.
    recovery_interval: float = Field(
        15.0, gt=0, validation_alias=_env("TASKGATE_RECOVERY_INTERVAL", "recovery_interval")
    )
    #: Seconds a watched worker's heartbeat key may be missing before its RUNNING tasks are
    #: re-run (acks_late) or end FAILED WorkerLost; default 60.
    worker_lost_timeout: float = Field(
        60.0, gt=0, validation_alias=_env("TASKGATE_WORKER_LOST_TIMEOUT", "worker_lost_timeout")
    )
    #: Seconds after publishing before a QUEUED task that no worker reported on is looked
    #: for in the broker (Redis only) and republished if it is gone; also how long a RUNNING
    #: task on a live worker may go without an update before the workers are asked whether
    #: they still hold it; default 30 (with two recovery passes: at most a minute after
    #: Redis returns).
    lost_queued_after: float = Field(
        30.0, gt=0, validation_alias=_env("TASKGATE_LOST_QUEUED_AFTER", "lost_queued_after")
    )
    #: DATABASE_URL points at PgBouncer in transaction pooling mode: no prepared statement
    #: outlives its transaction (each statement is parsed again). Default off.
    db_pgbouncer: bool = Field(False, validation_alias=_env("TASKGATE_DB_PGBOUNCER", "db_pgbouncer"))
    #: Database connection pool size.
    db_pool_size: int = Field(10, gt=0, validation_alias=_env("TASKGATE_DB_POOL_SIZE", "db_pool_size"))
    #: Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace: float = Field(
        10.0, ge=0, validation_alias=_env("TASKGATE_SHUTDOWN_GRACE", "shutdown_grace")
    )
    #: Seconds between health checks of the database and the broker.
    health_interval: float = Field(
        5.0, gt=0, validation_alias=_env("TASKGATE_HEALTH_INTERVAL", "health_interval")
    )
    #: Path of the TOML file declaring the callers (see service/domain/callers.py); empty = open mode.
    auth_file: str = Field("", validation_alias=_env("TASKGATE_AUTH_FILE", "auth_file"))
    #: Allow open mode (no auth file) on a non-loopback address.
    allow_insecure: bool = Field(False, validation_alias=_env("TASKGATE_ALLOW_INSECURE", "allow_insecure"))
    #: Serve reflection to callers without credentials.
    reflection_open: bool = Field(False, validation_alias=_env("TASKGATE_REFLECTION_OPEN", "reflection_open"))
    #: PEM paths of the server's certificate and key; both set = TLS.
    tls_cert: str = Field("", validation_alias=_env("TASKGATE_TLS_CERT", "tls_cert"))
    tls_key: str = Field("", validation_alias=_env("TASKGATE_TLS_KEY", "tls_key"))
    #: PEM path of the CA that signs client certificates; set = clients must present one.
    tls_client_ca: str = Field("", validation_alias=_env("TASKGATE_TLS_CLIENT_CA", "tls_client_ca"))
    #: Largest request message, in bytes.
    max_message_bytes: int = Field(
        1024 * 1024, gt=0, validation_alias=_env("TASKGATE_MAX_MESSAGE_BYTES", "max_message_bytes")
    )
    #: Deepest nesting of lists and objects in args / kwargs.
    max_args_depth: int = Field(32, gt=0, validation_alias=_env("TASKGATE_MAX_ARGS_DEPTH", "max_args_depth"))
    #: Serialized size of args + kwargs, in bytes.
    max_args_bytes: int = Field(
        256 * 1024, gt=0, validation_alias=_env("TASKGATE_MAX_ARGS_BYTES", "max_args_bytes")
    )
    #: Most tasks in one EnqueueBatch call.
    max_batch: int = Field(1000, gt=0, validation_alias=_env("TASKGATE_MAX_BATCH", "max_batch"))
    #: Open StreamProgress calls per caller.
    max_streams_per_caller: int = Field(
        100, gt=0, validation_alias=_env("TASKGATE_MAX_STREAMS_PER_CALLER", "max_streams_per_caller")
    )
    #: Open StreamProgress calls per process.
    max_streams: int = Field(10_000, gt=0, validation_alias=_env("TASKGATE_MAX_STREAMS", "max_streams"))
    #: Seconds a StreamProgress call may stay open.
    stream_lifetime: float = Field(
        3600.0, gt=0, validation_alias=_env("TASKGATE_STREAM_LIFETIME", "stream_lifetime")
    )
    #: The asyncio event loop ``taskgate serve`` runs on: ``uvloop`` (faster) or ``asyncio``.
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", validation_alias=_env("TASKGATE_EVENT_LOOP", "event_loop")
    )
    #: Logging level name.
    log_level: str = Field("INFO", validation_alias=_env("TASKGATE_LOG_LEVEL", "log_level"))
    #: Log line format: ``text`` (default) or ``json`` (one JSON object per line: time,
    #: level, logger, message, task_id and trace_id when known; service/runtime/logs.py).
    log_format: Literal["text", "json"] = Field(
        "text", validation_alias=_env("TASKGATE_LOG_FORMAT", "log_format")
    )
    #: The garbage-collector policy (service/runtime/gcpolicy.py): ``managed`` keeps full collections
    #: out of the event loop's way; ``python`` leaves CPython's defaults.
    gc_policy: Literal["managed", "python"] = Field(
        "managed", validation_alias=_env("TASKGATE_GC", "gc_policy")
    )
    #: host:port of the Prometheus ``/metrics`` endpoint (one per process); empty (the
    #: default) = no metrics, at no cost.
    metrics_listen: str = Field("", validation_alias=_env("TASKGATE_METRICS_LISTEN", "metrics_listen"))
    #: Seconds a terminal task is kept before it is deleted (30 days by default); 0 = forever.
    retention: float = Field(30 * 86400.0, ge=0, validation_alias=_env("TASKGATE_RETENTION", "retention"))
    #: Record tasks seen in the result backend that no gateway enqueued (adopted; readable
    #: with read_all only). Default off.
    adopt_foreign: bool = Field(False, validation_alias=_env("TASKGATE_ADOPT_FOREIGN", "adopt_foreign"))

    @property
    def task_names(self) -> list[str]:
        """The explicit catalog from TASKGATE_TASKS; empty means use the workers app."""
        return [name.strip() for name in self.tasks.split(",") if name.strip()]
