"""A Celery app's ``beat_schedule`` as ScheduleService schedules (``taskgate schedules import``).

Each entry becomes one schedule named after the entry: a ``crontab`` becomes a five-field
cron expression in the app's time zone (``timezone``, UTC by default), a ``timedelta`` or a
number of seconds an interval. ``args``, ``kwargs`` and ``options`` (``queue``,
``priority``, ``expires`` in seconds) are carried over. Anything else (``solar``, custom
schedule classes, an entry without a task) is returned as a problem, never dropped silently.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Characters a schedule_id may hold; others in an entry name become '-'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class Entry:
    """One translated beat entry: the keyword arguments of ``create_schedule``."""

    schedule_id: str
    name: str
    task_name: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Translation:
    """What an app's beat_schedule becomes: the schedules, and the entries that cannot."""

    entries: list[Entry]
    problems: list[tuple[str, str]]


def load_app(spec: str) -> Any:
    """The Celery app ``MODULE:ATTRIBUTE`` names (``MODULE`` alone: its ``app``).

    Raises:
        ValueError: the module or attribute does not exist.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute or "app")
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load the Celery app {spec!r}: {exc}") from exc


def schedule_id_of(name: str) -> str:
    """A beat entry name as a schedule_id (unsafe characters become '-', at most 200)."""
    return _UNSAFE.sub("-", name.strip())[:200] or "unnamed"


def cron_of(schedule: Any) -> str:
    """A celery ``crontab`` as five cron fields (its original field texts)."""
    return " ".join(
        str(part)
        for part in (
            schedule._orig_minute,
            schedule._orig_hour,
            schedule._orig_day_of_month,
            schedule._orig_month_of_year,
            schedule._orig_day_of_week,
        )
    )


def _timing(schedule: Any, zone: str) -> dict[str, Any]:
    """The spec of a beat schedule; ValueError for a kind that has none."""
    from celery.schedules import crontab, solar
    from celery.schedules import schedule as every

    if isinstance(schedule, dt.timedelta):
        return {"interval": schedule}
    if isinstance(schedule, int | float) and not isinstance(schedule, bool):
        return {"interval": dt.timedelta(seconds=schedule)}
    if isinstance(schedule, crontab):
        return {"cron": cron_of(schedule), "time_zone": zone}
    if isinstance(schedule, solar):
        raise ValueError("solar schedules (sunrise, sunset, …) have no cron or interval equivalent")
    if type(schedule) is every:
        return {"interval": getattr(schedule, "run_every")}  # noqa: B009 - untyped in celery
    raise ValueError(f"custom schedule class {type(schedule).__name__} cannot be translated")


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if options.get("queue"):
        fields["queue"] = str(options["queue"])
    if options.get("priority") is not None:
        fields["priority"] = int(options["priority"])
    expires = options.get("expires")
    if isinstance(expires, int | float):
        fields["expire_after"] = float(expires)
    elif isinstance(expires, dt.timedelta):
        fields["expire_after"] = expires
    elif expires is not None:
        raise ValueError(f"options.expires {expires!r} is not a number of seconds")
    return fields


def translate(app: Any) -> Translation:
    """Translate ``app.conf.beat_schedule``."""
    zone = str(app.conf.timezone or "UTC")  # beat evaluates crontabs in the app's time zone
    entries, problems = [], []
    for name, entry in (app.conf.beat_schedule or {}).items():
        try:
            task_name = entry.get("task")
            if not task_name:
                raise ValueError("the entry names no task")
            fields = _timing(entry["schedule"], zone)
            fields.update(args=list(entry.get("args") or ()), kwargs=dict(entry.get("kwargs") or {}))
            fields.update(_options(entry.get("options") or {}))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append((name, str(exc)))
            continue
        entries.append(Entry(schedule_id_of(name), name, task_name, fields))
    return Translation(entries, problems)
