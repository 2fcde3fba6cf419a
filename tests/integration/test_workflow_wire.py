"""The gateway sends a workflow as Celery's own canvas does: the same messages on the same
lists (the chain in ``embed.chain``, ``group``/``group_index``, the chord body in
``embed.chord``) and the same chord size key on the result backend, field by field — both
through Celery's canvas on the private app (``capture``) and, for the plain shapes, built
by hand (``build``)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.canvas import Signature, chain, group

from service.broker.canvas import BuiltinTasks, CanvasCapture
from service.broker.publisher import RedisPublisher
from service.domain.workflow import ChainStep, GroupStep, Step, TaskStep
from service.results.chords import BackendWriter
from taskgate.worker.contract import CelerySettings, common_conf

#: Fields that differ between any two senders: a fresh tag, the sender's identity (its
#: reply queue also appears in every embedded signature's options).
_VOLATILE = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin")}


def _ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


#: Every option a TaskTemplate can give but ``expire_after`` (an absolute time on the wire:
#: two senders never agree on it), as TaskStep fields and as Celery's signature options.
_OPTIONS: dict[str, Any] = {
    "queue": "wire-q",
    "priority": 3,
    "headers": {"x-tenant": "t1"},
    "time_limit": 30.0,
    "soft_time_limit": 20.0,
}


def _task(
    path: str,
    name: str,
    task_id: str,
    *args: Any,
    immutable: bool = False,
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> TaskStep:
    return TaskStep(
        path=path,
        task_name=name,
        args=list(args),
        kwargs=kwargs or {},
        task_id=task_id,
        immutable=immutable,
        **options,
    )


def _sig(
    app: Celery,
    name: str,
    task_id: str,
    *args: Any,
    immutable: bool = False,
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Signature:
    return Signature(
        name,
        args=args,
        kwargs=kwargs or {},
        options={"task_id": task_id, **options},
        immutable=immutable,
        app=app,
    )


def _chain_case(app: Celery) -> tuple[Step, Any]:
    a, b, c = _ids(3)
    ours = ChainStep(
        "root",
        (_task("r0", "demo.add", a, 1, 2), _task("r1", "demo.add", b, 3), _task("r2", "demo.add", c, 4)),
    )
    theirs = chain(_sig(app, "demo.add", a, 1, 2), _sig(app, "demo.add", b, 3), _sig(app, "demo.add", c, 4))
    return ours, theirs


def _chord_case(app: Celery) -> tuple[Step, Any]:
    ids, gid, body = _ids(4), str(uuid.uuid4()), str(uuid.uuid4())
    members = tuple(_task(f"g{i}", "demo.add", ids[i], i, i) for i in range(4))
    ours = ChainStep("root", (GroupStep("g", members, gid), _task("b", "demo.sum", body)))
    header = group([_sig(app, "demo.add", ids[i], i, i) for i in range(4)], app=app).set(task_id=gid)
    return ours, chain(header, _sig(app, "demo.sum", body), app=app)


def _chain_of_groups_case(app: Celery) -> tuple[Step, Any]:
    a, g1, g2, s1, h1, h2, s2 = _ids(7)
    gid1, gid2 = _ids(2)
    ours = ChainStep(
        "root",
        (
            _task("a", "demo.add", a, 1, 1),
            GroupStep("g", (_task("g1", "demo.add", g1, 10), _task("g2", "demo.add", g2, 20)), gid1),
            _task("s1", "demo.sum", s1),
            GroupStep("h", (_task("h1", "demo.add", h1, 1), _task("h2", "demo.add", h2, 2)), gid2),
            _task("s2", "demo.sum", s2),
        ),
    )
    theirs = chain(
        _sig(app, "demo.add", a, 1, 1),
        group([_sig(app, "demo.add", g1, 10), _sig(app, "demo.add", g2, 20)], app=app).set(task_id=gid1),
        _sig(app, "demo.sum", s1),
        group([_sig(app, "demo.add", h1, 1), _sig(app, "demo.add", h2, 2)], app=app).set(task_id=gid2),
        _sig(app, "demo.sum", s2),
        app=app,
    )
    return ours, theirs


def _group_of_chains_case(app: Celery) -> tuple[Step, Any]:
    a, b, c, d = _ids(4)
    gid = str(uuid.uuid4())
    ours = GroupStep(
        "root",
        (
            ChainStep("x", (_task("x0", "demo.add", a, 1, 2), _task("x1", "demo.add", b, 3))),
            ChainStep("y", (_task("y0", "demo.add", c, 5, 5), _task("y1", "demo.add", d, 1, immutable=True))),
        ),
        gid,
    )
    theirs = group(
        [
            chain(_sig(app, "demo.add", a, 1, 2), _sig(app, "demo.add", b, 3)),
            chain(_sig(app, "demo.add", c, 5, 5), _sig(app, "demo.add", d, 1, immutable=True)),
        ],
        app=app,
    ).set(task_id=gid)
    return ours, theirs


def _group_case(app: Celery) -> tuple[Step, Any]:
    ids, gid = _ids(5), str(uuid.uuid4())
    ours = GroupStep("root", tuple(_task(f"g{i}", "demo.add", ids[i], i, i) for i in range(5)), gid)
    theirs = group([_sig(app, "demo.add", ids[i], i, i) for i in range(5)], app=app).set(task_id=gid)
    return ours, theirs


def _group_with_options_case(app: Celery) -> tuple[Step, Any]:
    a, b, c = _ids(3)
    gid = str(uuid.uuid4())
    kwargs = {"note": "x" * 40, "deep": {"a": [1, {"b": [2, {"c": 3}]}]}}
    ours = GroupStep(
        "root",
        (
            _task("g0", "demo.add", a, 1.5, True, kwargs=kwargs, **_OPTIONS),
            _task("g1", "demo.add", b, "text", None, [1, [2, [3, [4]]]]),
            _task("g2", "demo.add", c, *range(400)),  # argsrepr past Celery's 1024 characters
        ),
        gid,
    )
    theirs = group(
        [
            _sig(app, "demo.add", a, 1.5, True, kwargs=kwargs, **_OPTIONS),
            _sig(app, "demo.add", b, "text", None, [1, [2, [3, [4]]]]),
            _sig(app, "demo.add", c, *range(400)),
        ],
        app=app,
    ).set(task_id=gid)
    return ours, theirs


def _chain_with_options_case(app: Celery) -> tuple[Step, Any]:
    a, b, c, d = _ids(4)
    ours = ChainStep(
        "root",
        (
            _task("r0", "demo.add", a, 1, 2, **_OPTIONS),
            _task("r1", "demo.add", b, 3, kwargs={"k": 1}, **_OPTIONS),
            _task("r2", "demo.add", c, 4, 5, immutable=True),
            _task("r3", "demo.add", d, 6, priority=9),
        ),
    )
    theirs = chain(
        _sig(app, "demo.add", a, 1, 2, **_OPTIONS),
        _sig(app, "demo.add", b, 3, kwargs={"k": 1}, **_OPTIONS),
        _sig(app, "demo.add", c, 4, 5, immutable=True),
        _sig(app, "demo.add", d, 6, priority=9),
        app=app,
    )
    return ours, theirs


def _chord_then_chain_case(app: Celery) -> tuple[Step, Any]:
    ids, gid, body, after1, after2 = _ids(3), *_ids(4)
    members = tuple(_task(f"g{i}", "demo.add", ids[i], i, i, **(_OPTIONS if i else {})) for i in range(3))
    ours = ChainStep(
        "root",
        (
            GroupStep("g", members, gid),
            _task("b", "demo.sum", body, **_OPTIONS),
            _task("c", "demo.add", after1, 1),
            _task("d", "demo.add", after2, 2, immutable=True, queue="wire-q2"),
        ),
    )
    header = group(
        [_sig(app, "demo.add", ids[i], i, i, **(_OPTIONS if i else {})) for i in range(3)], app=app
    ).set(task_id=gid)
    theirs = chain(
        header,
        _sig(app, "demo.sum", body, **_OPTIONS),
        _sig(app, "demo.add", after1, 1),
        _sig(app, "demo.add", after2, 2, immutable=True, queue="wire-q2"),
        app=app,
    )
    return ours, theirs


def _immutable_chord_body_case(app: Celery) -> tuple[Step, Any]:
    ids, gid, body = _ids(2), str(uuid.uuid4()), str(uuid.uuid4())
    members = tuple(_task(f"g{i}", "demo.add", ids[i], i, i) for i in range(2))
    ours = ChainStep(
        "root", (GroupStep("g", members, gid), _task("b", "demo.add", body, 1, 2, immutable=True))
    )
    header = group([_sig(app, "demo.add", ids[i], i, i) for i in range(2)], app=app).set(task_id=gid)
    return ours, chain(header, _sig(app, "demo.add", body, 1, 2, immutable=True), app=app)


#: Every shape, and whether the gateway builds it by hand (``CanvasCapture.build``).
CASES: dict[str, tuple[Callable[[Celery], tuple[Step, Any]], bool]] = {
    "chain": (_chain_case, True),
    "chain-with-options": (_chain_with_options_case, True),
    "group": (_group_case, True),
    "group-with-options": (_group_with_options_case, True),
    "chord": (_chord_case, True),
    "chord-then-chain": (_chord_then_chain_case, True),
    "chord-immutable-body": (_immutable_chord_body_case, True),
    "chain-of-groups": (_chain_of_groups_case, False),
    "group-of-chains": (_group_of_chains_case, False),
}
_RUNS = [(case, how) for case, (_, plain) in CASES.items() for how in ("canvas", "plain")[: 1 + plain]]


@pytest.fixture
def private(settings: CelerySettings) -> Iterator[tuple[CelerySettings, redis.Redis]]:
    prefix = f"{settings.key_prefix}wire-{uuid.uuid4().hex[:8]}-"
    private = settings.model_copy(update={"key_prefix": prefix})
    client = redis.Redis.from_url(private.broker_url)
    yield private, client
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


_UUID_IN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _normal(value: Any, known: set[str]) -> Any:
    """``value`` without the sender's reply queue, and with every id the canvas made up
    itself as ``<generated>`` (a chord's group id: Celery draws a new one when it freezes
    the chord, whatever id the group was given)."""
    if isinstance(value, dict):
        return {k: _normal(v, known) for k, v in value.items() if k != "reply_to"}
    if isinstance(value, list):
        return [_normal(v, known) for v in value]
    if isinstance(value, str) and _UUID.match(value) and value not in known:
        return "<generated>"
    return value


def _known_ids(step: Step) -> set[str]:
    if isinstance(step, TaskStep):
        return {step.task_id}
    found = {step.group_id} if isinstance(step, GroupStep) else set()
    for child in step.steps:
        found |= _known_ids(child)
    return found


def _stored(client: redis.Redis, prefix: str, known: set[str]) -> dict[str, Any]:
    """Every key under ``prefix``: lists decoded (body included), strings with their TTL
    (to the minute), sets as sorted lists."""
    found: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*"):
        name = _UUID_IN.sub(lambda m: m[0] if m[0] in known else "<generated>", key.decode()[len(prefix) :])
        kind = client.type(key)
        if kind == b"list":
            messages = []
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                message["body"] = json.loads(base64.b64decode(message["body"]))
                for section, field in _VOLATILE:
                    assert message[section].pop(field)
                messages.append(_normal(message, known))
            found[name] = messages
        elif kind == b"string":
            found[name] = (client.get(key), round(client.ttl(key) / 60))
        elif kind == b"set":
            found[name] = sorted(member.decode() for member in client.smembers(key))
    return found


@pytest.mark.parametrize(("case", "how"), _RUNS)
async def test_same_as_celerys_canvas(
    case: str, how: str, private: tuple[CelerySettings, redis.Redis]
) -> None:
    settings, client = private
    # a producer that does not import the tasks (as the gateway): the demo tasks other tests
    # imported would otherwise be sent through Task.apply_async, with the task's own options
    app = Celery("canvas-test", set_as_current=False, tasks=BuiltinTasks())
    app.conf.update(common_conf(settings))
    # no result subscriptions (nothing on the wire; they would outlive the test's loop)
    app.backend.__dict__["on_task_call"] = lambda *_, **__: None
    app.backend.__dict__["add_pending_result"] = lambda result, *_, **__: result
    ours, theirs = CASES[case][0](app)
    with app.producer_or_acquire() as producer:
        theirs.apply_async(producer=producer)
    app.close()
    expected = _stored(client, settings.key_prefix, _known_ids(ours))
    client.delete(*client.scan_iter(match=f"{settings.key_prefix}*"))

    canvas, now = CanvasCapture(settings), dt.datetime.now(dt.UTC)
    captured = canvas.build(ours, now) if how == "plain" else canvas.capture(ours, now)
    assert captured is not None, "a plain shape is built by hand"
    writer = BackendWriter.from_settings(settings)
    publisher = RedisPublisher.from_settings(settings)
    try:
        await writer.write(captured.writes)
        await publisher.publish(captured.deliveries)
    finally:
        await publisher.aclose()
        await writer.aclose()
    sent = _stored(client, settings.key_prefix, _known_ids(ours))

    assert sent == expected


@pytest.mark.parametrize("case", [case for case, (_, plain) in CASES.items() if not plain])
def test_other_shapes_go_through_celerys_canvas(case: str, settings: CelerySettings) -> None:
    app = Celery("canvas-test", set_as_current=False)
    ours, _ = CASES[case][0](app)
    assert CanvasCapture(settings).build(ours, dt.datetime.now(dt.UTC)) is None
