"""Celery settings shared by the workers and the gateway.

The broker's transport options must be identical in every process that talks to the
broker (a consumer restores unacknowledged messages with its own ``visibility_timeout``),
so both sides build them here from the same environment variables.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The custom Celery state ``report_progress`` writes.
PROGRESS_STATE = "PROGRESS"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")


class CelerySettings(BaseSettings):
    """Where the broker and the result backend are, read from the environment."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_BROKER_URL", "broker_url"),
    )
    result_backend: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "result_backend"),
    )
    #: Prepended to every Redis key and channel of the broker and the result backend,
    #: so several deployments (or test runs) can share one Redis.
    key_prefix: str = Field("", validation_alias=AliasChoices("TASKGATE_KEY_PREFIX", "key_prefix"))
    #: Seconds a taken-but-unacknowledged message stays hidden before the broker restores it.
    visibility_timeout: int = Field(
        3600, validation_alias=AliasChoices("CELERY_VISIBILITY_TIMEOUT", "visibility_timeout")
    )
    #: Seconds a result stays in Redis (the gateway's database keeps it for good).
    result_expires: int = Field(
        86400, validation_alias=AliasChoices("CELERY_RESULT_EXPIRES", "result_expires")
    )

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError("TASKGATE_KEY_PREFIX may use only letters, digits and _ . : -")
        return value

    @property
    def task_meta_prefix(self) -> str:
        """The Redis key (and channel) prefix of every task's result document."""
        return f"{self.key_prefix}celery-task-meta-"


def common_conf(settings: CelerySettings) -> dict[str, Any]:
    """Celery configuration every process of a deployment must agree on."""
    broker_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    backend_options: dict[str, Any] = {}
    if settings.key_prefix:
        broker_options["global_keyprefix"] = settings.key_prefix
        backend_options["global_keyprefix"] = settings.key_prefix
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": backend_options,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "enable_utc": True,
        "timezone": "UTC",
        "broker_connection_retry_on_startup": True,
    }
