"""The task catalog (service.domain.catalog) and the plain demo functions it lists (workers.work)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from service.domain.catalog import Catalog
from service.domain.errors import ArgumentsDoNotBind, UnknownTask
from workers import work


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_app("workers:app")


def test_from_app_lists_demo_tasks_without_celery_builtins(catalog: Catalog) -> None:
    assert {"demo.add", "demo.progress", "demo.fail", "demo.sleep"} <= set(catalog.names)
    assert not [name for name in catalog.names if name.startswith("celery.")]
    assert catalog.names == sorted(catalog.names)


def test_unknown_task_is_named(catalog: Catalog) -> None:
    with pytest.raises(UnknownTask, match=r"demo\.nope"):
        catalog.check("demo.nope", [], {})


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("demo.add", [1], {}),
        ("demo.add", [1, 2, 3], {}),
        ("demo.add", [1, 2], {"z": 3}),
        ("demo.add", [1], {"x": 2}),
        ("demo.progress", [], {}),
    ],
)
def test_arguments_that_do_not_bind(
    catalog: Catalog, name: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ArgumentsDoNotBind, match=name):
        catalog.check(name, args, kwargs)


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("demo.add", [1, 2], {}),
        ("demo.add", [1], {"y": 2}),
        ("demo.add", [], {"x": 1, "y": 2}),
        ("demo.progress", [3], {}),
        ("demo.progress", [3], {"interval": 0}),
        ("demo.fail", ["boom"], {}),
        ("demo.sleep", [0.5], {}),
    ],
)
def test_arguments_that_bind(catalog: Catalog, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    catalog.check(name, args, kwargs)


def test_from_names_accepts_any_arguments_for_listed_names() -> None:
    catalog = Catalog.from_names(["ext.a", "", "ext.b"])
    assert catalog.names == ["ext.a", "ext.b"]
    catalog.check("ext.a", [1, 2, 3], {"anything": True})
    catalog.check("ext.b", [], {})
    with pytest.raises(UnknownTask, match=r"ext\.c"):
        catalog.check("ext.c", [], {})


def test_work_add() -> None:
    assert work.add(2, 3) == 5
    assert work.add(0.5, 0.25) == 0.75


def test_work_count_steps_reports_each_step() -> None:
    calls: list[tuple[int, int]] = []
    assert work.count_steps(3, 0, lambda i, n: calls.append((i, n))) == 3
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_work_count_steps_zero_and_negative() -> None:
    calls: list[tuple[int, int]] = []
    assert work.count_steps(0, 0, lambda i, n: calls.append((i, n))) == 0
    assert calls == []
    with pytest.raises(ValueError, match="negative"):
        work.count_steps(-1, 0, lambda i, n: None)


def test_work_fail_raises_demo_error() -> None:
    with pytest.raises(work.DemoError, match=r"^kaboom$"):
        work.fail("kaboom")


late_app = Celery("late", set_as_current=False)


@late_app.task(name="late.rerun", acks_late=True)
def _rerun() -> None:
    """A task that opted in to re-runs."""


@late_app.task(name="late.once")
def _once() -> None:
    """A task that did not."""


def test_from_app_knows_which_tasks_opted_in_to_reruns() -> None:
    catalog = Catalog.from_app(f"{__name__}:late_app")
    assert catalog.acks_late("late.rerun")
    assert not catalog.acks_late("late.once")
    assert not catalog.acks_late("late.unknown")


def test_a_catalog_of_names_knows_no_opt_in() -> None:
    assert not Catalog.from_names(["late.rerun"]).acks_late("late.rerun")
