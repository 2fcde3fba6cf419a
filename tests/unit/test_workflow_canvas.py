"""A workflow's messages and tree, without infrastructure: the hand-built messages of the
plain shapes agree with Celery's canvas (the integration test ``test_workflow_wire.py``
compares both with what Celery itself stores), every entry message and every embedded
signature carries the caller's trace context, and the domain's tree JSON (written out field
by field) and fingerprint equal what ``dataclasses.asdict`` gives."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any

import pytest

from service.broker.canvas import CanvasCapture
from service.broker.canvas_plain import args_repr
from service.domain.workflow import (
    ChainStep,
    GroupStep,
    Step,
    TaskStep,
    fingerprint,
    from_json,
    to_json,
    with_ids,
)
from service.store.workflows import stored_tree
from taskgate.worker.contract import CelerySettings

TRACE = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=1",
}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _t(path: str, *args: Any, **fields: Any) -> TaskStep:
    return TaskStep(path=path, task_name="demo.add", args=list(args), **fields)


SHAPES: dict[str, Step] = {
    "group": GroupStep("root", (_t("a", 1, 2), _t("b", 3, 4, queue="q", priority=2))),
    "chain": ChainStep("root", (_t("a", 1, 2, headers={"x": "y"}), _t("b", 3), _t("c", 4, immutable=True))),
    "chord": ChainStep("root", (GroupStep("g", (_t("a", 1, 1), _t("b", 2, 2))), _t("s"), _t("c", 5))),
    "nested": GroupStep("root", (ChainStep("x", (_t("a", 1, 2), _t("b", 3))), _t("c", 4, 4))),
}


@pytest.fixture(scope="module")
def canvas() -> CanvasCapture:
    return CanvasCapture(CelerySettings(key_prefix="unit-"))


def _normal(value: Any) -> Any:
    """``value`` with every id as ``<id>`` (a chord's group id is made up) and without the
    sender's identity (``reply_to``, ``origin``)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in ("reply_to", "origin")}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str):
        return _UUID.sub("<id>", value)
    return value


@pytest.mark.parametrize("shape", ["group", "chain", "chord"])
def test_hand_built_is_celerys_canvas_with_the_trace(canvas: CanvasCapture, shape: str) -> None:
    root, now = with_ids(SHAPES[shape]), dt.datetime.now(dt.UTC)
    built = canvas.build(root, now, TRACE)
    captured = canvas.capture(root, now, TRACE)
    assert built is not None
    assert built.deliveries == [
        dataclasses.replace(d, message=built.deliveries[i].message) for i, d in enumerate(captured.deliveries)
    ]
    assert _normal([d.message for d in built.deliveries]) == _normal([d.message for d in captured.deliveries])
    assert [(w.key.rsplit(".", 1)[-1], w.value, w.expire) for w in built.writes] == [
        (w.key.rsplit(".", 1)[-1], w.value, w.expire) for w in captured.writes
    ]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_step_carries_the_trace(canvas: CanvasCapture, shape: str) -> None:
    root, now = with_ids(SHAPES[shape]), dt.datetime.now(dt.UTC)
    captured = canvas.build(root, now, TRACE) or canvas.capture(root, now, TRACE)
    assert captured.deliveries
    for delivery in captured.deliveries:
        assert delivery.message is not None
        assert {k: delivery.message["headers"][k] for k in TRACE} == TRACE
        assert delivery.trace_headers == TRACE
        embed = delivery.message["body"][2]
        signatures = [*(embed["chain"] or []), *([embed["chord"]] if embed["chord"] else [])]
        signatures += [s for sig in signatures for s in sig["options"].get("chain") or []]
        for signature in signatures:
            assert {k: signature["options"]["headers"][k] for k in TRACE} == TRACE


def test_no_trace_no_trace_headers(canvas: CanvasCapture) -> None:
    built = canvas.build(with_ids(SHAPES["chain"]), dt.datetime.now(dt.UTC))
    assert built is not None
    (delivery,) = built.deliveries
    assert delivery.message is not None and "traceparent" not in delivery.message["headers"]
    assert delivery.trace_headers is None
    assert "headers" not in delivery.message["body"][2]["chain"][1]["options"]  # step b has none


def _asdict_tree(step: Step) -> dict[str, Any]:
    """The tree as ``dataclasses.asdict`` writes it (what ``to_json`` spells out by hand)."""
    if isinstance(step, TaskStep):
        body = dataclasses.asdict(step)
        body.pop("path")
        return {"task": body}
    if isinstance(step, ChainStep):
        return {"chain": [_asdict_tree(child) for child in step.steps]}
    assert isinstance(step, GroupStep)
    return {"group": [_asdict_tree(child) for child in step.steps], "group_id": step.group_id}


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("task_id", "group_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def test_the_tree_and_fingerprint_are_asdicts() -> None:
    root = with_ids(
        ChainStep(
            "root",
            (
                GroupStep(
                    "g",
                    (
                        _t("a", 1.5, "é✓", None, [1, {"task_id": "inner"}], kwargs={"group_id": 1, "k": [2]}),
                        _t("b", 10**20, True, headers={"h": "v"}, time_limit=3.0, expire_after=9.5),
                    ),
                ),
                _t("s", immutable=True, soft_time_limit=1.0, queue="q", priority=0),
            ),
        )
    )
    assert to_json(root) == _asdict_tree(root)
    assert (
        fingerprint(root)
        == hashlib.sha256(
            json.dumps(
                _without_ids(_asdict_tree(root)), sort_keys=True, separators=(",", ":"), default=str
            ).encode()
        ).hexdigest()
    )
    stored = stored_tree(root)
    assert to_json(from_json(stored)) == to_json(root)
    assert isinstance(root, ChainStep) and isinstance(root.steps[1], TaskStep)
    assert stored["chain"][1] == {"task": {"task_name": "demo.add", "queue": "q", "priority": 0,
        "soft_time_limit": 1.0, "immutable": True, "task_id": root.steps[1].task_id}}  # fmt: skip


@pytest.mark.parametrize(
    "args", [[], [1], [1.0, 2.5, -3], [True, None, 10**30], list(range(500)), ["a"], [[1]], [{"a": 1}]]
)
def test_args_repr_is_celerys(args: list[Any]) -> None:
    from celery.utils.saferepr import saferepr

    assert args_repr(args, 3) == saferepr(tuple(args), 1024, maxlevels=3)
