"""The README's fenced code blocks, and how tests/integration/test_readme.py runs each kind.

A block is run unless the line right before its opening fence (blank lines aside) is a marker
with a reason::

    <!-- readme-test: skip (needs a Docker engine) -->

How each language is run (``run_kind``):

- ``sh``: line by line, from the repository root, each line on its own with ``/bin/sh -c``
  (lines ending in ``\\`` are joined first; blank and comment-only lines are dropped). A
  line made only of variable assignments (``B="…"``, ``export X=1 Y=2``) is put in front of
  every later line of the block instead. Every line must exit 0.
- ``python``: the block is one script, run by the venv's Python in an empty directory
  (not the repository), so it shows the installed package works as pasted. It must exit 0.
- ``toml``: parsed with ``tomllib``.
- ``text``: a map of the repository: the first word of every line that does not start with
  a space is a path that must exist.

Before a line or a script runs, two placeholders are replaced (``substitute``): the default
address ``127.0.0.1:50051`` becomes the live gateway's, and ``<task id>`` becomes the last
task id (a UUID) printed by an earlier line of the same block. Any other ``<…>`` left in a
line that runs fails the test, so no placeholder goes unnoticed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

#: The address the README writes; replaced by the live gateway's.
README_TARGET = "127.0.0.1:50051"
TASK_ID = "<task id>"
RUN_KINDS = ("sh", "python", "toml", "text")

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<verb>[\w-]+)\s*(?:\((?P<reason>.*)\))?\s*-->$")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PLACEHOLDER = re.compile(r"<[a-z][a-z ]*[a-z]>")


class ReadmeFormatError(AssertionError):
    """A block or marker the runner does not understand."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    #: The language after the opening fence (``sh``, ``python``, ...).
    lang: str
    #: The block's text, without the fences.
    code: str
    #: 1-based line number of the opening fence.
    line: int
    #: Why the block is not run (from its marker); None means it is run.
    skip: str | None = None

    @property
    def name(self) -> str:
        """A short id for test reports: ``L42-sh``."""
        return f"L{self.line}-{self.lang or 'plain'}"


def parse(text: str) -> list[Block]:
    """Every fenced block of ``text``, with its skip reason if marked.

    Raises:
        ReadmeFormatError: an unknown marker verb, a skip without a reason, a marker not
            followed by a block, an unclosed fence, or a block with no way to run it.
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    pending: tuple[str, int] | None = None  # (reason, line) of a skip marker waiting for its block
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        marker = _MARKER.match(stripped)
        fence = _FENCE.match(stripped)
        if marker is not None:
            pending = (_skip_reason(marker, index + 1), index + 1)
        elif fence is not None:
            end = _closing_fence(lines, index)
            reason = pending[0] if pending else None
            block = Block(fence["lang"], "\n".join(lines[index + 1 : end]) + "\n", index + 1, reason)
            if reason is None and block.lang not in RUN_KINDS:
                raise ReadmeFormatError(
                    f"line {block.line}: a {block.lang or 'plain'!s} block is never run: use one of "
                    f"{RUN_KINDS} or mark it <!-- readme-test: skip (why) -->"
                )
            blocks.append(block)
            pending, index = None, end
        elif stripped and pending is not None:
            raise ReadmeFormatError(f"line {pending[1]}: the marker is not right before a code block")
        index += 1
    if pending is not None:
        raise ReadmeFormatError(f"line {pending[1]}: the marker is not right before a code block")
    return blocks


def _skip_reason(marker: re.Match[str], line: int) -> str:
    if marker["verb"] != "skip":
        raise ReadmeFormatError(f"line {line}: unknown readme-test marker {marker['verb']!r} (only skip)")
    reason = (marker["reason"] or "").strip()
    if not reason:
        raise ReadmeFormatError(f"line {line}: a skipped block needs a reason: readme-test: skip (why)")
    return reason


def _closing_fence(lines: list[str], start: int) -> int:
    for end in range(start + 1, len(lines)):
        if lines[end].strip() == "```":
            return end
    raise ReadmeFormatError(f"line {start + 1}: the code block is never closed")


def shell_lines(code: str) -> list[str]:
    """The block's lines as commands: continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def is_assignment(line: str) -> bool:
    """Whether the line only assigns shell variables (``A=1 B="x y"``, ``export A=1``)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return False
    if words[:1] == ["export"]:
        words = words[1:]
    return bool(words) and all(_ASSIGNMENT.match(word) for word in words)


def last_task_id(output: str) -> str | None:
    """The last task id (UUID) in ``output``, if any."""
    found = _UUID.findall(output)
    return found[-1] if found else None


def substitute(text: str, target: str, task_id: str | None) -> str:
    """``text`` with the live address and the last task id put in.

    Raises:
        ReadmeFormatError: ``<task id>`` with no earlier id, or any other ``<…>`` placeholder.
    """
    text = text.replace(README_TARGET, target)
    if TASK_ID in text:
        if task_id is None:
            raise ReadmeFormatError(f"{TASK_ID} before any line printed a task id: {text.strip()}")
        text = text.replace(TASK_ID, task_id)
    left = _PLACEHOLDER.findall(text)
    if left:
        raise ReadmeFormatError(f"placeholders the runner does not fill: {left} in {text.strip()}")
    return text


def map_paths(code: str, root: Path) -> list[str]:
    """The paths named at the start of a repository map's lines that do not exist under ``root``."""
    missing = []
    for line in code.splitlines():
        if line and not line[0].isspace():
            path = line.split()[0]
            if not (root / path).exists():
                missing.append(path)
    return missing
