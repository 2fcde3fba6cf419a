"""Reading what people type: task arguments (inline JSON, ``@file``, ``-`` for stdin) and times.

Times: ``+SECONDS`` (or ``+90s``, ``+5m``, ``+2h``, ``+1d``) from now, or an RFC 3339 / ISO 8601
time. A time without a zone is read in this machine's local zone, and every parsed time says so
(``When.note``) so the confirmation line can repeat it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class BadInput(ValueError):
    """What the person typed cannot be used; the message says which option and why."""


@dataclass(frozen=True)
class When:
    """A parsed time: the moment (aware) and how it was read."""

    moment: dt.datetime
    #: "" for an explicit zone or a relative time; else which zone a naive time was read in.
    note: str = ""


def argument(text: str) -> Any:
    """One positional task argument: its JSON value if it parses, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def json_option(option: str, text: str, stdin: IO[str] | None = None) -> Any:
    """The JSON value of ``option``: inline, ``@path`` (read from a file) or ``-`` (stdin).

    Raises:
        BadInput: the file cannot be read or the text is not JSON.
    """
    source = "stdin" if text == "-" else text[1:] if text.startswith("@") else ""
    if text == "-":
        text = (stdin or sys.stdin).read()
    elif text.startswith("@"):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{option}: cannot read {source}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" (from {source})" if source else ""
        raise BadInput(f"{option}{where} is not JSON: {exc}") from exc


def task_arguments(
    positional: list[str], args_text: str | None, kwargs_text: str | None, stdin: IO[str] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """The task's positional and keyword arguments from the command line.

    Raises:
        BadInput: both positional arguments and ``--args``, both options reading stdin,
            ``--args`` not a JSON array or ``--kwargs`` not a JSON object.
    """
    if args_text is not None and positional:
        raise BadInput("give the positional arguments either on the command line or with --args, not both")
    if args_text == "-" and kwargs_text == "-":
        raise BadInput("only one of --args and --kwargs can read stdin (-)")
    args: Any = [argument(text) for text in positional]
    if args_text is not None:
        args = json_option("--args", args_text, stdin)
        if not isinstance(args, list):
            raise BadInput(f"--args must be a JSON array, got {type(args).__name__}")
    kwargs: Any = {} if kwargs_text is None else json_option("--kwargs", kwargs_text, stdin)
    if not isinstance(kwargs, dict):
        raise BadInput(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    return args, kwargs


def seconds(option: str, text: str) -> float:
    """A span such as ``30``, ``+30``, ``90s``, ``5m``, ``2h`` or ``1d``, in seconds.

    Raises:
        BadInput: not a non-negative number with an optional unit.
    """
    body = text.strip().removeprefix("+")
    scale = _UNITS.get(body[-1:].lower(), 0.0) if body else 0.0
    number = body[:-1] if scale else body
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise BadInput(f"{option}: {text!r} is not a number of seconds (e.g. 30, 90s, 5m, 2h, 1d)") from None
    if value < 0 or not math.isfinite(value):
        raise BadInput(f"{option}: {text!r} must be a finite number, not negative")
    return value


def local_zone(moment: dt.datetime | None = None) -> str:
    """This machine's zone at ``moment`` (default now), e.g. ``CEST, UTC+02:00``."""
    local = (moment or dt.datetime.now()).astimezone()
    offset = local.strftime("%z")
    return f"{local.tzname()}, UTC{offset[:3]}:{offset[3:]}"


def point_in_time(option: str, text: str, *, now: dt.datetime | None = None) -> When:
    """``+SPAN`` from now, or a time (RFC 3339; without a zone: this machine's local time).

    Raises:
        BadInput: neither form.
    """
    now = now or dt.datetime.now(dt.UTC)
    if text.strip().startswith("+"):
        return When(now + dt.timedelta(seconds=seconds(option, text)))
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"{option}: {text!r} is neither +SECONDS nor a time like {example_time(now)}"
        ) from None
    if moment.tzinfo is not None:
        return When(moment)
    aware = moment.astimezone()  # a naive datetime is taken as local time
    return When(aware, f"no zone given: read as local time ({local_zone(moment)})")


def expiry(text: str, *, now: dt.datetime | None = None) -> When:
    """``--expires``: seconds from now (``30``, ``+30``, ``2h``) or a time, as ``point_in_time``."""
    now = now or dt.datetime.now(dt.UTC)
    body = text.strip()
    if body[:1].isdigit() and ("-" not in body and ":" not in body and "T" not in body.upper()):
        return When(now + dt.timedelta(seconds=seconds("--expires", body)))
    return point_in_time("--expires", body, now=now)


def example_time(now: dt.datetime | None = None) -> str:
    """Tomorrow at 09:00 UTC in RFC 3339 (a help example the gateway accepts, whenever it is read)."""
    tomorrow = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).date() + dt.timedelta(days=1)
    return f"{tomorrow.isoformat()}T09:00:00Z"


def describe(moment: dt.datetime) -> str:
    """``moment`` for people: local time with its zone, and UTC."""
    local = moment.astimezone()
    utc = moment.astimezone(dt.UTC)
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()} ({utc:%Y-%m-%dT%H:%M:%SZ})"
