"""The worker contract (taskgate.worker.contract) and configure(app): names both sides agree on."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.app.task import Task
from kombu.transport.redis import Channel

import taskgate.worker
from service.broker.redis_message import RedisLayout
from service.config import Settings
from taskgate.worker import ConfigurationError, OnceTask, configure
from taskgate.worker.contract import (
    PROGRESS_STATE,
    CelerySettings,
    RedisKeys,
    common_conf,
    meta_pattern,
    required_conf,
)
from taskgate.worker.guard import app_key_prefix

REDIS = "redis://127.0.0.1:6379/0"
PREFIXES = ["", "tg-", "tgx", "a:b:", "run.1."]


def _app(**conf: object) -> Celery:
    app = Celery("contract-test", set_as_current=False, broker=REDIS, backend=REDIS)
    app.conf.update(conf)
    return app


@pytest.fixture
def apps() -> Iterator[list[Celery]]:
    made: list[Celery] = []
    yield made
    for app in made:
        app.close()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_result_keys_are_celerys(prefix: str, apps: list[Celery]) -> None:
    app = _app(result_backend_transport_options={"global_keyprefix": prefix} if prefix else {})
    apps.append(app)
    celery_key = app.backend.get_key_for_task("abc-123").decode()
    keys = RedisKeys(prefix)
    assert keys.task_meta("abc-123") == celery_key
    assert keys.task_id_of(celery_key) == "abc-123"
    assert CelerySettings(key_prefix=prefix).task_meta_prefix == keys.task_meta_prefix
    assert fnmatch.fnmatchcase(celery_key, keys.task_meta_pattern)
    assert keys.task_meta_pattern == meta_pattern(Settings(key_prefix=prefix).task_meta_prefix)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_binding_keys_are_kombus_and_the_gateways(prefix: str) -> None:
    keys = RedisKeys(prefix)
    binding, permanent, _ = RedisLayout(key_prefix=prefix).binding_keys("reports")
    assert binding == keys.queue_binding("reports") == prefix + Channel.keyprefix_queue % "reports"
    assert permanent == keys.queue_binding_permanent("reports")
    assert permanent == prefix + Channel.keyprefix_binding_permanent % "reports"


def test_run_claim_key() -> None:
    assert RedisKeys("p-").run_claim("id1", 2) == "p-taskgate-run-id1-2"


def test_common_conf_carries_what_the_gateway_needs() -> None:
    conf = common_conf(CelerySettings(key_prefix="tg-", result_backend=REDIS))
    assert required_conf().items() <= conf.items()
    assert conf["broker_transport_options"]["global_keyprefix"] == "tg-"
    assert conf["result_backend_transport_options"] == {"global_keyprefix": "tg-"}
    assert conf["result_backend"] == REDIS
    assert conf["taskgate_key_prefix"] == "tg-"
    assert PROGRESS_STATE == "PROGRESS"


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="TASKGATE_KEY_PREFIX"):
        CelerySettings(key_prefix="a b*")


def test_configure_adds_the_settings_and_the_guard(apps: list[Celery]) -> None:
    app = _app(accept_content=["pickle"])
    apps.append(app)

    @app.task(name="t.lazy")
    def lazy() -> None: ...

    assert configure(app, key_prefix="tgx") is app
    assert app.conf.task_track_started and app.conf.result_extended
    assert app.conf.result_serializer == "json"
    assert app.conf.accept_content == ["pickle", "json"]
    assert app.conf.broker_transport_options["global_keyprefix"] == "tgx"
    assert app_key_prefix(app) == "tgx"
    assert isinstance(app.tasks["t.lazy"], OnceTask)
    assert app.backend.get_key_for_task("x").decode() == RedisKeys("tgx").task_meta("x")


def test_configure_keeps_the_apps_base_class(apps: list[Celery]) -> None:
    class Audited(Task):  # type: ignore[type-arg]
        audited = True

    app = Celery("contract-base", set_as_current=False, backend=REDIS, task_cls=Audited)
    apps.append(app)
    configure(app, key_prefix="")

    @app.task(name="t.audited")
    def audited() -> None: ...

    task = app.tasks["t.audited"]
    assert isinstance(task, OnceTask) and isinstance(task, Audited)


def test_configure_reads_the_prefix(monkeypatch: pytest.MonkeyPatch, apps: list[Celery]) -> None:
    monkeypatch.setenv("TASKGATE_KEY_PREFIX", "env-")
    app = _app()
    apps.append(app)
    configure(app)
    assert app.conf.result_backend_transport_options["global_keyprefix"] == "env-"
    monkeypatch.delenv("TASKGATE_KEY_PREFIX")
    own = _app(
        broker_transport_options={"global_keyprefix": "own:", "visibility_timeout": 60},
        result_backend_transport_options={"global_keyprefix": "own:"},
    )
    apps.append(own)
    configure(own)
    assert app_key_prefix(own) == "own:"
    assert own.conf.broker_transport_options["visibility_timeout"] == 60


def test_configure_refuses_what_the_gateway_cannot_follow(apps: list[Celery]) -> None:
    rpc = Celery("contract-rpc", set_as_current=False, backend="rpc://")
    clash = _app(result_backend_transport_options={"global_keyprefix": "theirs-"})
    built = _app()
    apps.extend([rpc, clash, built])
    with pytest.raises(ConfigurationError, match="Redis result backend"):
        configure(rpc, key_prefix="")
    with pytest.raises(ConfigurationError, match="differs"):
        configure(clash, key_prefix="ours-")
    assert built.Task is not None  # the base class exists: too late to add the guard
    with pytest.raises(ConfigurationError, match="before they are created"):
        configure(built, key_prefix="")


def test_public_names() -> None:
    assert sorted(taskgate.worker.__all__) == sorted(
        [
            "PROGRESS_STATE",
            "CelerySettings",
            "ConfigurationError",
            "OnceTask",
            "RedisKeys",
            "TaskCancelled",
            "cancel_requested",
            "check_cancel",
            "common_conf",
            "configure",
            "report_progress",
        ]
    )
    for name in taskgate.worker.__all__:
        assert getattr(taskgate.worker, name) is not None


def test_imports_stay_on_their_side() -> None:
    code = (
        "import sys, taskgate.worker.contract\n"
        "assert 'celery' not in sys.modules, 'the contract imports celery'\n"
        "from taskgate.worker import configure, report_progress, OnceTask\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('service', 'workers', 'myapp')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
