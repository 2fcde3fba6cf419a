"""Reading a compose file: the parsed mapping, its services, and the report checks write to.

Everything here is plain data access over the YAML, shared by the file checks
(``devtools.check_compose``) and the start check (``devtools.compose_start``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A compose service (or any other mapping of the file), as loaded.
Spec = dict[str, Any]

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ComposeError(Exception):
    """The file cannot be read or is not a compose mapping with services."""


@dataclass
class Report:
    """What the checks found: one ``ok`` or ``FAIL`` line each, printed as they come."""

    problems: list[str] = field(default_factory=list)
    quiet: bool = False

    def ok(self, message: str) -> None:
        """Record (print) a check that passed."""
        self._print(f"  ok    {message}")

    def note(self, message: str) -> None:
        """Record (print) something not checked, with the reason."""
        self._print(f"  skip  {message}")

    def fail(self, message: str) -> None:
        """Record (print) a problem."""
        self.problems.append(message)
        self._print(f"  FAIL  {message}")

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    @property
    def count(self) -> int:
        """How many problems so far (compare before and after a check)."""
        return len(self.problems)


def as_dict(value: object) -> Spec:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, dict) else {}


def load(path: Path) -> Spec:
    """Parse a compose file as YAML 1.2 (merge keys resolved, duplicate keys refused).

    Raises:
        ComposeError: it does not parse, or has no non-empty ``services`` mapping.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        doc = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as exc:
        raise ComposeError(f"YAML does not parse: {exc}") from None
    return checked_document(doc)


def checked_document(doc: object) -> Spec:
    """``doc`` if it is a mapping with a non-empty ``services`` mapping.

    Raises:
        ComposeError: it is not.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict) or not doc["services"]:
        raise ComposeError("the file is not a mapping with a non-empty `services` mapping")
    return doc


def services_of(doc: Spec) -> dict[str, Spec]:
    """The ``services`` mapping, each service as a mapping (empty for malformed ones)."""
    return {str(name): as_dict(spec) for name, spec in as_dict(doc.get("services")).items()}


def dependencies(service: Spec) -> dict[str, str]:
    """``depends_on`` as {target: condition}, from either the list or the mapping form."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): "service_started" for name in raw}
    return {
        str(name): str(as_dict(spec).get("condition", "service_started"))
        for name, spec in as_dict(raw).items()
    }


def dependency_graph(services: Mapping[str, Spec]) -> dict[str, dict[str, str]]:
    """Every service's dependencies: {service: {target: condition}}."""
    return {name: dependencies(spec) for name, spec in services.items()}


def healthcheck_test(service: Spec) -> object:
    """The healthcheck's ``test`` (None when absent or disabled)."""
    check = as_dict(service.get("healthcheck"))
    if check.get("disable") is True:
        return None
    return check.get("test")


def environment(service: Spec) -> dict[str, str | None]:
    """The service's ``environment`` from the list or the mapping form (None = no value)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        env: dict[str, str | None] = {}
        for item in raw:
            key, sep, value = str(item).partition("=")
            env[key] = value if sep else None
        return env
    return {str(k): None if v is None else _scalar(v) for k, v in as_dict(raw).items()}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR`` and ``$$``.

    Args:
        value: The text to expand.
        env: The variables (default: this process's environment).
    """
    variables = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = variables.get(name)
        if op in (":-", "-"):
            return arg if current is None or (op == ":-" and current == "") else current
        if op in (":+", "+"):
            return arg if current is not None and (op == "+" or current != "") else ""
        return current or ""

    return _VAR.sub(sub, value)


def duration(value: object, default: float) -> float:
    """A compose duration (``"1m30s"``, ``"5s"``, ``"250ms"``) in seconds; ``default`` if absent."""
    if value is None:
        return default
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)
