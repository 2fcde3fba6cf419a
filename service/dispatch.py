"""Handing tasks to the Celery broker, off the event loop.

The gateway's Celery app only sends: it has no result backend, so it never subscribes to
the reply channel of each task it sends. Celery and kombu are synchronous, so every
publish runs on one dedicated thread with one producer (one broker connection); that
bounds the work off the loop and keeps kombu's per-publish cost from multiplying.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from service.domain import Delivery
from service.errors import BrokerUnavailable
from workers.config import CelerySettings, common_conf

log = logging.getLogger(__name__)


def send_only_app(settings: CelerySettings) -> Celery:
    """A Celery app that can publish to the broker and nothing else."""
    app = Celery("taskgate-gateway", set_as_current=False)
    app.conf.update(
        common_conf(settings),
        result_backend=None,
        task_publish_retry=False,
        broker_connection_timeout=3,
        broker_pool_limit=2,
        broker_pool_acquire_timeout=10,
    )
    return app


def send_options(delivery: Delivery, now: dt.datetime) -> dict[str, Any]:
    """The ``send_task`` keyword arguments for one delivery."""
    options: dict[str, Any] = {
        "args": delivery.args,
        "kwargs": delivery.kwargs,
        "task_id": delivery.task_id,
    }
    if delivery.queue:
        options["queue"] = delivery.queue
    if delivery.priority is not None:
        options["priority"] = delivery.priority
    if delivery.run_time > now:
        options["eta"] = delivery.run_time
    if delivery.expire_time is not None:
        options["expires"] = delivery.expire_time
    if delivery.headers:
        options["headers"] = delivery.headers
    return options


class Publisher:
    """Publishes deliveries to the broker on one background thread."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskgate-publish")

    async def publish(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Publish in order; return the ids the broker accepted.

        Stops at the first failure: the rest stay in the outbox for the relay.

        Raises:
            BrokerUnavailable: not even the first one could be published.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._publish_blocking, list(deliveries))

    def _publish_blocking(self, deliveries: list[Delivery]) -> list[str]:
        done: list[str] = []
        now = dt.datetime.now(dt.UTC)
        try:
            with self._app.producer_or_acquire() as producer:
                for delivery in deliveries:
                    self._app.send_task(delivery.task_name, producer=producer, **send_options(delivery, now))
                    done.append(delivery.task_id)
        except Exception as exc:
            if not done:
                log.warning("broker unreachable, %d task(s) left in the outbox: %r", len(deliveries), exc)
                raise BrokerUnavailable("the broker is unreachable") from exc
            log.warning("publish stopped after %d of %d: %r", len(done), len(deliveries), exc)
        return done

    def ping(self) -> None:
        """Blocking: raise unless the broker answers (for health checks, off the loop)."""
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    async def aping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.ping)
        except Exception as exc:
            raise BrokerUnavailable("the broker is unreachable") from exc

    def close(self) -> None:
        """Wait for the publishing thread to finish and release the broker connections."""
        self._executor.shutdown(wait=True)
        self._app.close()
