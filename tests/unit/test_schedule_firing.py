"""A firing's task (``service.usecases.schedule_firing``): the same task the template's
``TaskSpec`` describes, with fresh random ids."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest

from service.domain.catalog import Catalog
from service.domain.model import TaskState
from service.domain.schedule import OverlapPolicy, Schedule, TaskTemplate, Timing, request_id_of
from service.usecases.schedule_firing import ID_BATCH, Decider, TaskIds

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=30)
TEMPLATE = TaskTemplate(
    "demo.add", args=[1, 2], kwargs={"c": 3}, queue="q", priority=5, headers={"h": "v"}, time_limit=9.0
)


def _schedule(template: TaskTemplate = TEMPLATE, **changes: object) -> Schedule:
    base = Schedule(
        schedule_id="s1",
        timing=Timing(interval=dt.timedelta(minutes=1)),
        task=template,
        caller="alice",
        create_time=NOW,
        update_time=NOW,
        anchor_time=NOW,
        next_run_time=NOW,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_task_ids_are_distinct_version_4_uuids_across_batches() -> None:
    ids = TaskIds()
    drawn = [ids() for _ in range(ID_BATCH * 2 + 3)]
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("expire_after", [None, 120.0])
def test_a_firing_task_is_what_the_templates_spec_describes(expire_after: float | None) -> None:
    template = TaskTemplate(**{**TEMPLATE.to_json(), "expire_after": expire_after})
    decider = Decider(Catalog({"demo.add": None}), LEASE)
    firing = decider.decide(_schedule(template), False, NOW)
    assert firing.plan.fire == NOW
    new = firing.task
    assert new is not None
    request_id = request_id_of(_schedule(template), NOW)
    spec = template.spec(NOW, request_id)
    delivery = new.delivery
    assert (delivery.task_name, delivery.args, delivery.kwargs, delivery.queue) == (
        spec.task_name, spec.args, spec.kwargs, spec.queue,
    )  # fmt: skip
    assert (delivery.priority, delivery.expire_time, delivery.headers) == (
        spec.priority, spec.expire_time, spec.headers,
    )  # fmt: skip
    assert (delivery.time_limit, delivery.soft_time_limit) == (spec.time_limit, spec.soft_time_limit)
    assert delivery.run_time == NOW
    assert new.request_id == request_id
    assert new.fingerprint == spec.fingerprint()
    assert new.state is TaskState.QUEUED
    assert (new.caller, new.schedule_id, new.publish_after) == ("alice", "s1", NOW + LEASE)
    again = decider.decide(_schedule(template), False, NOW).task
    assert again is not None
    assert again.task_id != new.task_id
    assert again.fingerprint == new.fingerprint


def test_a_slot_overlapping_a_running_firing_is_skipped_under_skip() -> None:
    decider = Decider(Catalog({"demo.add": None}), LEASE)
    skipped = decider.decide(_schedule(), True, NOW)
    assert skipped.task is None
    assert skipped.plan.skipped == 1
    allowed = decider.decide(_schedule(overlap_policy=OverlapPolicy.ALLOW), True, NOW)
    assert allowed.task is not None


def test_a_template_the_catalog_refuses_skips_the_slot() -> None:
    decider = Decider(Catalog({"other.task": None}), LEASE)
    firing = decider.decide(_schedule(), False, NOW)
    assert firing.task is None
    assert firing.plan.skipped == 1
