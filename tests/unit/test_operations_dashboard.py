"""deploy/grafana/taskgate.json queries only metrics the gateway exports (the CI check)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from devtools.compose_file import load
from service.api.metrics import RpcMetrics
from service.runtime.telemetry import TaskMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "taskgate.json"
#: Identifiers in PromQL that name a metric of ours.
_METRIC = re.compile(r"\b(?:grpc_server|taskgate)_[a-z0-9_]+\b")
#: The series a metric family of each type exposes, by suffix.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def exported() -> set[str]:
    """Every series name the gateway's two registries can expose."""
    registry = CollectorRegistry()
    TaskMetrics(registry, ["demo.add"])
    RpcMetrics(registry)
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    names = exported()
    assert "grpc_server_handled_total" in names and "taskgate_task_run_seconds_bucket" in names
    exprs = queries()
    assert len(exprs) >= 15
    for expr in exprs:
        used = _METRIC.findall(expr)
        assert used, f"a query of no taskgate metric: {expr}"
        unknown = set(used) - names
        assert not unknown, f"{expr}: not exported: {sorted(unknown)}"


def test_the_dashboard_covers_what_operators_ask() -> None:
    text = " ".join(queries())
    for metric in (
        "grpc_server_handled_total",  # rates and errors by method
        "taskgate_queue_tasks",  # queue depth
        "taskgate_task_queue_seconds_bucket",  # wait time percentiles
        "taskgate_task_run_seconds_bucket",  # run time percentiles
        "taskgate_outbox_pending",
        "taskgate_streams_open",
        "taskgate_event_loop_lag_seconds_bucket",
    ):
        assert metric in text, metric


def test_compose_provisions_the_dashboard() -> None:
    root = DASHBOARD.parents[2]
    compose = load(root / "docker-compose.yml")
    services = compose["services"]
    mounts = [volume.split(":")[0] for volume in services["grafana"]["volumes"]]
    assert "./deploy/grafana/taskgate.json" in mounts
    for mount in mounts + [v.split(":")[0] for v in services["prometheus"]["volumes"]]:
        if mount.startswith("./"):
            assert (root / mount).exists(), mount
    listen = services["gateway"]["environment"]["TASKGATE_METRICS_LISTEN"]
    scrape = (root / "deploy" / "prometheus.yml").read_text()
    assert f'targets: ["gateway:{listen.rsplit(":", 1)[1]}"]' in scrape
