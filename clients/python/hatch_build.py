"""Hatchling build hook: put the repository's taskgate/ package into the client's wheel.

A regular wheel (and the sdist) copies ``../../taskgate`` in; a wheel built from the sdist
finds ``taskgate/`` beside ``pyproject.toml`` by itself. An editable install copies
nothing: its ``.pth`` file puts the repository root on ``sys.path`` (``dev-mode-dirs``), so
edits in ``taskgate/`` are live. A static ``force-include`` cannot tell the two apart, which
is why this is a hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def repository_package(root: Path) -> Path | None:
    """The repository's taskgate/ directory, or None in an unpacked sdist (which holds its own)."""
    if (root / "taskgate").is_dir():
        return None
    return (root / ".." / ".." / "taskgate").resolve()


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds taskgate/ to regular wheels; leaves editable wheels to the ``.pth`` file."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Called by hatchling before each build.

        Args:
            version: ``"standard"`` for a regular wheel, ``"editable"`` for ``pip install -e``.
            build_data: hatchling's build data; ``force_include`` maps a source to its path
                in the wheel.
        """
        source = repository_package(Path(self.root))
        if source is None or (self.target_name == "wheel" and version == "editable"):
            return
        build_data["force_include"][str(source)] = "taskgate"
