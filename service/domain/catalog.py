"""Which task names the gateway accepts, whether arguments fit them, and which tasks opted in
to re-runs (Celery's ``acks_late``)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from service.domain.errors import ArgumentsDoNotBind, UnknownTask


class Catalog:
    """Task names the gateway may send, with their signatures where known."""

    def __init__(
        self, signatures: Mapping[str, inspect.Signature | None], *, acks_late: Iterable[str] = ()
    ) -> None:
        """A catalog of ``signatures`` (None: arguments not checked); ``acks_late`` names the
        tasks that opted in to re-runs."""
        self._signatures = dict(signatures)
        self._acks_late = frozenset(acks_late)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Catalog:
        """A catalog of names for workers built elsewhere: arguments are not checked."""
        return cls({name: None for name in names if name})

    @classmethod
    def from_app(cls, spec: str) -> Catalog:
        """The tasks registered in the Celery app ``module:attribute``, without ``celery.*``."""
        module_name, _, attribute = spec.partition(":")
        app = getattr(importlib.import_module(module_name), attribute or "app")
        app.loader.import_default_modules()
        signatures: dict[str, inspect.Signature | None] = {}
        late: set[str] = set()
        for name, task in app.tasks.items():
            if name.startswith("celery."):
                continue
            if getattr(task, "acks_late", False) is True:
                late.add(name)
            try:
                signatures[name] = inspect.signature(task.run)
            except (TypeError, ValueError):
                signatures[name] = None
        return cls(signatures, acks_late=late)

    @property
    def names(self) -> list[str]:
        """The accepted task names, sorted."""
        return sorted(self._signatures)

    def acks_late(self, task_name: str) -> bool:
        """True when ``task_name`` opted in to re-runs (``acks_late``): a run lost with its
        worker may be run again. Unknown for a catalog built from names: False."""
        return task_name in self._acks_late

    def check(self, task_name: str, args: list[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise unless ``task_name`` is known and ``args``/``kwargs`` bind to its signature."""
        if task_name not in self._signatures:
            raise UnknownTask(
                f"task_name {task_name!r} is not in this gateway's catalog; known tasks: "
                + ", ".join(self.names[:20])
                + (" …" if len(self._signatures) > 20 else "")
            )
        if self._signatures[task_name] is None:
            return
        # whether arguments bind depends only on how many there are and the keywords used
        problem = self._bind_problem(task_name, len(args), tuple(kwargs))
        if problem is not None:
            raise ArgumentsDoNotBind(problem)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a catalog lives as long as the process
    def _bind_problem(self, task_name: str, positional: int, keywords: tuple[str, ...]) -> str | None:
        signature = self._signatures[task_name]
        if signature is None:
            return None
        try:
            signature.bind(*([None] * positional), **dict.fromkeys(keywords))
        except TypeError as exc:
            return f"arguments do not fit {task_name}{signature_text(signature)}: {exc}"
        return None


def signature_text(signature: inspect.Signature) -> str:
    """A signature without its annotations, as a caller in any language reads it."""
    plain = signature.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return str(plain)
