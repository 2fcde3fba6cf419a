"""The gateway's consumer of the durable state feed: every state, at least once, whatever was down.

A taskgate worker (``taskgate.worker``) appends every state it stores to a Redis Stream,
``RedisKeys.state_feed``, as an entry ``{"id": <task_id>, "doc": <the result document>}``
(the document it also ``SETEX``-es and ``PUBLISH``-es). The gateways of a deployment read
that stream as one consumer group (``STATE_FEED_GROUP``); each process is one consumer,
named ``<hostname>-<pid>``. A round reads up to ``count`` entries (when a read brings
fewer, it waits ``linger`` seconds and takes what has arrived meanwhile: a trickle of
states then costs one statement per ``linger`` rather than one per state, as with the
recorder's flush interval), writes them to the database (the transition rule makes a
repeat harmless and never overwrites a terminal state) and acknowledges them (XACK) only
once the write has committed. So:

- a gateway down for hours (results expiring meanwhile) finds every entry still in the
  stream, which keeps about ``STATE_FEED_MAXLEN`` of them;
- the database down: nothing is acknowledged, the supervisor backs off, and the next round
  reads this consumer's pending entries again (XREADGROUP from ``0``) before new ones;
- a gateway that stops (SIGTERM) finishes the round in hand, writing and acknowledging what
  it has read (``close`` waits for it), then leaves the group if it holds nothing;
- a gateway that dies holding entries: another replica takes them over (XAUTOCLAIM) once
  they have been idle ``claim_idle`` seconds;
- replicas read a task's entries out of order (each round takes the next entries, whoever
  holds the task's earlier ones; a takeover writes old entries late): every update carries
  its entry's position (``feed_position``), and an unfinished task does not take one older
  than the newest it has taken, so its state and progress never go back;
- an entry whose update the database refuses (``StatementRejected``) or that does not
  decode is logged and acknowledged: one bad document never blocks the feed.

Pub/sub (``hub.py``) stays the fast path for streams; the feed hands watchers the terminal
states it writes (and every state while the subscription is down). The recorder keeps
writing what pub/sub brings for workers without the library; the documents a feed worker
marks (``contract.FEED_MARK``), and the tasks this consumer has read (``on_read``, wired to
``Recorder.fed``), it leaves to the feed, on every replica: each state is written once, by
the replica that reads its entry. Of their states read from Redis (a status read's refresh,
the reconcile) it writes only a terminal one: such a read may be older than a state the feed
has written meanwhile, and would take the record back (``Recorder.record``). Redis failures are the domain's
``ResultBackendUnavailable``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.domain.model import TaskUpdate, merge_updates
from service.results.document import parse_payload
from service.results.hub import ProgressHub, redis_errors
from service.runtime import telemetry
from service.store.adoption import AdoptionStore
from service.store.base import TaskStorePort
from service.store.errors import StatementRejected
from taskgate.worker.contract import STATE_FEED_GROUP

log = logging.getLogger(__name__)

#: One stream entry as redis-py returns it: its id and its fields (None once trimmed).
Entry = tuple[bytes, dict[bytes, bytes] | None]

#: The cursor of an XAUTOCLAIM scan that has gone round the whole pending list.
_SCAN_DONE = b"0-0"


#: ``feed_position``: a stream entry id ``<ms>-<seq>`` as one integer, ``ms * SEQ_SPAN + seq``
#: (seq capped at ``SEQ_SPAN - 1``: a million entries in one millisecond do not happen).
SEQ_SPAN = 1_000_000


def feed_position(entry_id: bytes | str) -> int | None:
    """The order of an entry in the stream as an integer (BIGINT until the year 2262);
    None for an id that is not ``<ms>-<seq>``."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = raw.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        return None
    return int(ms) * SEQ_SPAN + min(int(seq), SEQ_SPAN - 1)


def consumer_name() -> str:
    """This process's consumer name in the group: ``<hostname>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StateFeed:
    """Reads the state feed as one consumer of the gateways' group; run ``step`` supervised."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        store: TaskStorePort,
        hub: ProgressHub,
        *,
        group: str = STATE_FEED_GROUP,
        consumer: str | None = None,
        count: int = 500,
        block: float = 1.0,
        claim_idle: float = 60.0,
        linger: float = 0.05,
        adoption: AdoptionStore | None = None,
        on_read: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        """A consumer of ``stream`` (not connected until the first ``step``).

        Args:
            redis_url: The Redis holding the stream (the result backend).
            stream: The stream's key (``RedisKeys(prefix).state_feed``).
            store: Where the states are written.
            hub: Whose watchers are handed what the feed writes.
            group: The consumer group of this deployment's gateways.
            consumer: This consumer's name (default ``consumer_name()``).
            count: Most entries read per round.
            block: Seconds a read waits for new entries.
            claim_idle: Seconds an entry read by another consumer may stay unacknowledged
                before this one takes it over; also half the time between two takeovers.
            linger: Seconds to wait for more entries after a read that brought fewer than
                ``count`` (0: write each read at once: about one statement per state
                at a trickle of states).
            adoption: Inserts rows for tasks sent around the gateway before each write
                (``TASKGATE_ADOPT_FOREIGN``); None: off.
            on_read: Called with the ids of the tasks of each round's entries before they
                are written (``Recorder.fed``: their pub/sub updates are then not written
                a second time); None: nobody.
        """
        self._adoption = adoption
        self._on_read = on_read
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_keepalive=True,
            socket_connect_timeout=5,
            socket_timeout=block + 10,
            client_name=f"taskgate-feed-{os.getpid()}",
        )
        self._stream = stream
        self._store = store
        self._hub = hub
        self._group = group
        self.consumer = consumer or consumer_name()
        self._count = count
        self._linger = linger
        self._block_ms = max(int(block * 1000), 1)
        self._claim_idle_ms = max(int(claim_idle * 1000), 1)
        self._claim_every = claim_idle / 2
        self._next_claim = 0.0  # a takeover pass first thing: a replica may have died meanwhile
        self._claim_cursor: bytes | None = None
        self._group_ready = False
        #: read this consumer's own pending entries (from ``0``) before new ones
        self._backlog = True
        #: the round in hand (it outlives a cancelled ``step``; ``close`` waits for it)
        self._round: asyncio.Future[None] | None = None

    async def step(self) -> None:
        """One round: read entries, write them, acknowledge them.

        A cancelled step (the gateway stopping) does not cancel its round: the round runs on
        (``close`` waits for it), so entries it has read are written and acknowledged here
        instead of staying pending under a consumer name no process uses again, until
        another replica takes them over ``claim_idle`` seconds later.

        Raises:
            ResultBackendUnavailable: Redis is unreachable (nothing acknowledged).
            DatabaseUnavailable: the write failed for want of a database (nothing
                acknowledged; the entries are read again from the pending list).
        """
        self._round = asyncio.ensure_future(self._one_round())
        await asyncio.shield(self._round)

    async def _one_round(self) -> None:
        try:
            with redis_errors():
                entries = await self._next_entries()
            if entries:
                await self._handle(entries)
        except BaseException:
            self._backlog = True
            raise

    async def _next_entries(self) -> list[Entry]:
        """The entries of this round: taken over from dead consumers, this consumer's own
        pending ones (after a start or a failure), or new ones."""
        if not self._group_ready:
            await self._create_group()
        if self._claim_cursor is not None or time.monotonic() >= self._next_claim:
            entries = await self._claim()
            if entries:
                return entries
        if self._backlog:
            entries = await self._read("0")
            if entries:
                return entries
            self._backlog = False
        return await self._read_new()

    async def _read_new(self) -> list[Entry]:
        """New entries: wait for some, then (``linger``) for more, up to ``count``."""
        entries = await self._read(">")
        if entries and len(entries) < self._count and self._linger > 0:
            await asyncio.sleep(self._linger)
            entries += await self._read(">", count=self._count - len(entries), wait=False)
        return entries

    async def _create_group(self) -> None:
        """Create the group (and the stream), reading from the stream's first entry:
        states written before any gateway consumed are states too."""
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
            log.info("state feed: created group %s on %s", self._group, self._stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self, start: str, *, count: int | None = None, wait: bool = True) -> list[Entry]:
        """XREADGROUP from ``start`` (``>``: new entries, waiting up to ``block`` unless not
        ``wait``; ``0``: this consumer's pending ones), at most ``count`` (default: the
        consumer's ``count``)."""
        block = self._block_ms if start == ">" and wait else None
        try:
            reply: Any = await self._redis.xreadgroup(
                self._group, self.consumer, {self._stream: start}, count=count or self._count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream or the group is gone (Redis restarted empty)
                self._group_ready = False
            raise
        if not reply:
            return []
        entries: list[Entry] = reply[0][1]
        return entries

    async def _claim(self) -> list[Entry]:
        """One XAUTOCLAIM page of entries idle longer than ``claim_idle`` (a consumer that
        died, or one stuck that long); the scan resumes where it stopped on the next round."""
        reply: Any = await self._redis.xautoclaim(
            self._stream,
            self._group,
            self.consumer,
            self._claim_idle_ms,
            start_id=self._claim_cursor or "0-0",
            count=self._count,
        )
        cursor, entries = reply[0], reply[1]
        if cursor in (_SCAN_DONE, "0-0"):
            self._claim_cursor = None
            self._next_claim = time.monotonic() + self._claim_every
        else:
            self._claim_cursor = cursor
        if entries:
            log.info(
                "state feed: %s took over %d entries idle for %.0fs",
                self.consumer,
                len(entries),
                self._claim_idle_ms / 1000,
            )
        claimed: list[Entry] = entries
        return claimed

    async def _handle(self, entries: Sequence[Entry]) -> None:
        """Write the entries' updates (one per task), then acknowledge every entry."""
        updates = self._updates(entries)
        if self._on_read is not None and updates:
            self._on_read(list(updates))
        written = await self._write(list(updates.values()))
        telemetry.states_written(written)
        with redis_errors():
            await self._redis.xack(self._stream, self._group, *[entry_id for entry_id, _ in entries])
        self._hand_to_watchers(written)

    def _updates(self, entries: Sequence[Entry]) -> dict[str, TaskUpdate]:
        """The entries' updates, folded into one per task in stream order."""
        updates: dict[str, TaskUpdate] = {}
        now = dt.datetime.now(dt.UTC)
        for entry_id, fields in entries:
            task_id, doc = (fields or {}).get(b"id"), (fields or {}).get(b"doc")
            if task_id is None or doc is None:
                if fields:  # a trimmed entry has no fields: nothing to say about it
                    log.warning("state feed: entry %r has no id or doc; skipped", entry_id)
                continue
            update = parse_payload(task_id.decode(errors="replace"), doc, now)
            if update is None:
                continue
            update = replace(update, feed_position=feed_position(entry_id))
            older = updates.get(update.task_id)
            updates[update.task_id] = update if older is None else merge_updates(older, update)
        return updates

    async def _write(self, updates: list[TaskUpdate]) -> list[TaskUpdate]:
        """Write a batch; returns the updates written. A refused batch is written one update
        at a time, and a refused update is logged and left out (its entry is acknowledged)."""
        if not updates:
            return []
        try:
            await self._apply(updates)
            return updates
        except StatementRejected:
            log.warning("state feed: a batch of %d was refused; writing one at a time", len(updates))
        written = []
        for update in updates:
            try:
                await self._apply([update])
            except StatementRejected:
                log.exception(
                    "task_id=%s: the database refused this %s update from the state feed; dropped",
                    update.task_id,
                    update.state,
                )
            else:
                written.append(update)
        return written

    async def _apply(self, updates: list[TaskUpdate]) -> None:
        if self._adoption is not None:
            await self._adoption.adopt(updates)
        await self._store.apply_updates(updates)

    def _hand_to_watchers(self, updates: Sequence[TaskUpdate]) -> None:
        """Hand watchers what pub/sub may not have brought: terminal states always (they
        cannot be overtaken), the others only while the subscription is down (the feed trails
        pub/sub, so an older progress would make a stream go back)."""
        subscribed = self._hub.ready
        for update in updates:
            if update.state.terminal or not subscribed:
                self._hub.deliver(update)

    async def close(self, grace: float = 10.0) -> None:
        """Let a round in hand end (at most ``grace`` seconds), leave the group if nothing is
        pending for this consumer, and release the Redis connection."""
        ended = True
        if self._round is not None and not self._round.done():
            try:
                await asyncio.wait_for(self._round, grace)
            except TimeoutError:
                ended = False
                log.warning("state feed: the last round did not end within %.0fs", grace)
            except Exception:  # its entries stay pending: read again or taken over
                log.info("state feed: the last round failed; its entries stay pending", exc_info=True)
        if ended and self._group_ready:
            await self._leave()
        await self._redis.aclose()

    async def _leave(self) -> None:
        """Delete this consumer from the group when it holds no entries (each process is a
        consumer of its own name: without this, every restart would leave one behind). With
        entries pending it stays, for another replica to take them over."""
        try:
            held = await self._redis.xpending_range(
                self._stream, self._group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not held:
                await self._redis.xgroup_delconsumer(self._stream, self._group, self.consumer)
        except Exception:  # Redis down: the consumer stays, as it would anyway
            log.debug("state feed: consumer %s not deleted", self.consumer, exc_info=True)


__all__ = ["StateFeed", "consumer_name"]
