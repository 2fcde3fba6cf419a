"""The Dockerfile check: every image a compose service builds runs as a non-root USER.

Only what that needs is parsed: instructions (with continuations, comments and heredocs),
the stages (``FROM … AS name``) and the last ``USER`` of each stage.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devtools.compose_file import Report, Spec, as_dict

_DIRECTIVE = re.compile(r"\s*#\s*(\w+)\s*=\s*(\S+)\s*$")
_HEREDOC = re.compile(r"<<-?\s*[\"']?([A-Za-z_][A-Za-z0-9_]*)[\"']?")
_REMOTE = re.compile(r"^([a-z]+://|git@)")


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile."""

    name: str | None
    base: str
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _escape_char(lines: list[str]) -> str:
    escape = "\\"
    for line in lines:  # parser directives come first
        m = _DIRECTIVE.match(line)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    return escape


def instructions(text: str) -> list[str]:
    """The instructions of a Dockerfile, continuations joined, comments and heredoc bodies dropped."""
    lines = text.splitlines()
    escape = _escape_char(lines)
    found: list[str] = []
    current = ""
    heredoc: str | None = None
    for line in lines:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # comment inside a continuation
        stripped = line.rstrip()
        if stripped.endswith(escape):
            current += stripped[: -len(escape)] + " "
            continue
        current += line
        found.append(current.strip())
        marker = _HEREDOC.search(current)
        if marker and current.split(None, 1)[0].upper() in ("RUN", "COPY", "ADD"):
            heredoc = marker.group(1)
        current = ""
    if current.strip():
        found.append(current.strip())
    return found


def stages(text: str) -> list[Stage]:
    """One ``Stage`` per ``FROM``; its user is the last ``USER`` in that stage (or None)."""
    result: list[Stage] = []
    for instruction in instructions(text):
        word, _, rest = instruction.partition(" ")
        word = word.upper()
        if word == "FROM":
            args = [a for a in rest.split() if not a.startswith("--")]
            name = args[2].lower() if len(args) >= 3 and args[1].upper() == "AS" else None
            result.append(Stage(name, args[0].lower() if args else ""))
        elif word == "USER" and result:
            result[-1].user = rest.strip()
        elif word == "ENV" and result:
            result[-1].env.update(_env_pairs(rest))
    return result


def _env_pairs(rest: str) -> dict[str, str]:
    """``ENV a=1 b="x y"`` or the legacy ``ENV a 1``."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.partition("=")[::2] for word in words)


def _lineage(all_stages: list[Stage], index: int) -> list[int]:
    """``index`` and the earlier stages it is built FROM, nearest first."""
    chain: list[int] = []
    while index not in chain:
        chain.append(index)
        parents = [i for i, s in enumerate(all_stages[:index]) if s.name == all_stages[index].base]
        if not parents:
            break
        index = parents[-1]
    return chain


def image_env(dockerfile: Path, target: str | None) -> dict[str, str]:
    """The ENV of the stage ``target`` (or the last), with what it inherits from earlier stages."""
    if not dockerfile.is_file():
        return {}  # reported by check_user
    found = stages(dockerfile.read_text(encoding="utf-8"))
    matches = [i for i, s in enumerate(found) if s.name == target] if target else [len(found) - 1]
    env: dict[str, str] = {}
    for index in reversed(_lineage(found, matches[-1]) if matches and found else []):
        env.update(found[index].env)
    return env


def effective_user(all_stages: list[Stage], index: int) -> tuple[str | None, str]:
    """The USER a stage runs as and the stage that sets it, following FROM <earlier stage>."""
    chain = _lineage(all_stages, index)
    for i in chain:
        if all_stages[i].user:
            return all_stages[i].user, all_stages[i].name or f"stage {i}"
    last = chain[-1]
    return None, all_stages[last].name or f"stage {last}"


def is_root(user: str) -> bool:
    """True for a USER that is root (by name or uid 0)."""
    name = user.split(":", 1)[0].strip()
    return name in ("", "root", "0")


def show(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def builds(
    compose_path: Path, services: Mapping[str, Spec], report: Report
) -> dict[tuple[Path, str | None], list[str]]:
    """{(Dockerfile, target): [services]} for every service with a ``build`` that can be checked."""
    found: dict[tuple[Path, str | None], list[str]] = {}
    for name, spec in services.items():
        raw = spec.get("build")
        if raw is None:
            continue
        build = {"context": raw} if isinstance(raw, str) else as_dict(raw)
        if "dockerfile_inline" in build:
            report.fail(f"{name}: dockerfile_inline is not checked; use a Dockerfile")
            continue
        context = str(build.get("context", "."))
        if _REMOTE.match(context):
            report.fail(f"{name}: remote build context {context!r} cannot be checked")
            continue
        dockerfile = (compose_path.parent / context / str(build.get("dockerfile", "Dockerfile"))).resolve()
        target = build.get("target")
        key = (dockerfile, None if target is None else str(target).lower())
        found.setdefault(key, []).append(name)
    return found


def check_user(dockerfile: Path, target: str | None, users: list[str], report: Report) -> None:
    """The stage ``target`` (or the last one) of ``dockerfile`` must run as a non-root USER."""
    label = f"{show(dockerfile)} target {target or '(last stage)'} for {', '.join(users)}"
    if not dockerfile.is_file():
        report.fail(f"{show(dockerfile)} (built by {', '.join(users)}) does not exist")
        return
    found = stages(dockerfile.read_text(encoding="utf-8"))
    if not found:
        report.fail(f"{show(dockerfile)}: no FROM instruction")
        return
    matches = [i for i, s in enumerate(found) if s.name == target] if target else [len(found) - 1]
    if not matches:
        report.fail(f"{label}: no stage named {target!r}")
        return
    user, where = effective_user(found, matches[-1])
    if user is None:
        report.fail(f"{label}: no USER instruction, so it runs as root")
    elif "$" in user:
        report.fail(f"{label}: USER {user} uses a variable; cannot verify it is not root")
    elif is_root(user):
        report.fail(f"{label}: runs as root (USER {user} in {where})")
    else:
        report.ok(f"{label}: USER {user} (not root)")


def check_dockerfiles(compose_path: Path, services: Mapping[str, Spec], report: Report) -> None:
    """Every Dockerfile stage a service builds runs as a non-root user; at least one build."""
    found = builds(compose_path, services, report)
    for (dockerfile, target), users in found.items():
        check_user(dockerfile, target, users, report)
    if not found:
        report.fail("no service is built from a Dockerfile")
