"""Validate docker-compose.yml without a Docker engine; with ``--start``, also start it locally.

The file checks:

1. the official Compose Specification JSON schema, as vendored in the check-jsonschema
   package (``check-jsonschema --builtin-schema vendor.compose-spec``);
2. taskgate's own rules: depends_on targets exist (no cycles), service_healthy targets have a
   healthcheck, one-shot targets do not restart, the app services share the same broker /
   backend / database settings, and the Dockerfile each build uses runs as a non-root USER.

``--start`` then runs every service built from the Dockerfile the way compose would, on this
machine (``devtools.compose_start``): a parser cannot see a process that exits at start-up.

Usage: ``python -m devtools.check_compose [--start] [--only SERVICE …] [COMPOSE_FILE]``
(``scripts/check-compose`` is the wrapper). Exit status: 0 valid, 1 problems found,
2 cannot check (missing file or validator).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from devtools.compose_file import (
    ComposeError,
    Report,
    Spec,
    dependency_graph,
    environment,
    healthcheck_test,
    interpolate,
    load,
    services_of,
)
from devtools.dockerfile import check_dockerfiles

ROOT = Path(__file__).resolve().parent.parent
#: Services this project's compose file must define.
EXPECTED_SERVICES = ("redis", "postgres", "migrate", "gateway", "worker", "flower")
#: Services running taskgate code (flower imports the workers app too): they must agree below.
APP_SERVICES = ("migrate", "gateway", "worker", "flower")
#: Must be set, identically, in every app service.
SHARED_REQUIRED = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL")
#: Broker options every process must agree on (taskgate/worker/contract.py): same value or all unset.
SHARED_OPTIONAL = ("TASKGATE_KEY_PREFIX", "CELERY_VISIBILITY_TIMEOUT")
#: Restart policies that would restart a one-shot container forever.
RESTARTING = ("always", "unless-stopped")
_RESTART = re.compile(r"no|always|unless-stopped|on-failure(:\d+)?")
Graph = dict[str, dict[str, str]]


class CannotCheck(Exception):
    """The check cannot run (exit status 2): no file, or no validator installed."""


def validator_version() -> str:
    """The installed check-jsonschema version.

    Raises:
        CannotCheck: check-jsonschema (or ruamel.yaml) is not installed.
    """
    try:
        import ruamel.yaml  # noqa: F401

        return metadata.version("check-jsonschema")
    except (ImportError, metadata.PackageNotFoundError) as exc:
        raise CannotCheck(
            f"{exc} in {sys.executable}\n"
            "  install the validator: pip install 'check-jsonschema>=0.39,<1' (taskgate's dev extras)"
        ) from None


def check_schema(path: Path, report: Report) -> None:
    """The file against the Compose Specification JSON schema (check-jsonschema's vendored copy)."""
    version = validator_version()
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*command, "--color", "never", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        report.ok(f"Compose Specification JSON schema (check-jsonschema {version}, vendor.compose-spec)")
    else:
        details = (result.stdout + result.stderr).strip().replace("\n", "\n        ")
        report.fail(f"Compose Specification JSON schema:\n        {details}")


def check_top_level(doc: Spec, services: Mapping[str, Spec], report: Report) -> None:
    """No obsolete ``version:``; every expected service present."""
    if "version" in doc:
        report.fail("top-level `version:` is obsolete in the Compose Specification; remove it")
    else:
        report.ok("no obsolete top-level `version:`")
    missing = [name for name in EXPECTED_SERVICES if name not in services]
    if missing:
        report.fail(f"expected services missing: {', '.join(missing)}")
    else:
        report.ok(f"expected services present: {', '.join(EXPECTED_SERVICES)}")


def find_cycle(graph: Graph) -> list[str] | None:
    """A depends_on cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check_depends_on(graph: Graph, report: Report) -> None:
    """Every depends_on target exists, is not the service itself, and there is no cycle."""
    before = report.count
    for name, deps in graph.items():
        for target in deps:
            if target == name:
                report.fail(f"{name}: depends_on itself")
            elif target not in graph:
                report.fail(f"{name}: depends_on unknown service {target!r}")
    cycle = find_cycle(graph)
    if cycle:
        report.fail(f"depends_on cycle: {' -> '.join(cycle)}")
    if report.count == before:
        edges = sum(len(deps) for deps in graph.values())
        report.ok(f"depends_on: {edges} dependencies, every target exists, no cycles")


def targets(graph: Graph, condition: str) -> list[str]:
    """The services some service waits for with ``condition``."""
    return sorted({t for deps in graph.values() for t, c in deps.items() if c == condition})


def check_healthy_targets(services: Mapping[str, Spec], graph: Graph, report: Report) -> None:
    """A service waited for with service_healthy must have a healthcheck."""
    before = report.count
    healthy = targets(graph, "service_healthy")
    for target in healthy:
        if target not in services:
            continue  # reported by check_depends_on
        test = healthcheck_test(services[target])
        if not test or (isinstance(test, list) and test[0] == "NONE"):
            users = sorted(n for n, deps in graph.items() if deps.get(target) == "service_healthy")
            report.fail(f"{target}: has no healthcheck, but {', '.join(users)} wait(s) for service_healthy")
    if report.count == before:
        report.ok(f"service_healthy targets have a healthcheck: {', '.join(healthy) or '(none)'}")


def check_restarts(services: Mapping[str, Spec], graph: Graph, report: Report) -> None:
    """One-shot targets do not restart; every restart policy is valid."""
    before = report.count
    oneshots = targets(graph, "service_completed_successfully")
    for target in oneshots:
        restart = services.get(target, {}).get("restart", "no")
        if str(restart) in RESTARTING:
            report.fail(
                f"{target}: is waited for with service_completed_successfully but has restart: {restart}"
            )
    if report.count == before:
        report.ok(f"service_completed_successfully targets do not restart: {', '.join(oneshots) or '(none)'}")
    before = report.count
    for name, spec in services.items():
        restart = spec.get("restart")
        if restart is not None and not _RESTART.fullmatch(str(restart)):
            report.fail(f"{name}: restart {restart!r} is not no, always, unless-stopped or on-failure[:N]")
    if report.count == before:
        report.ok("restart policies valid")


def check_healthchecks(services: Mapping[str, Spec], report: Report) -> None:
    """Every healthcheck test starts with CMD, CMD-SHELL or NONE and has a command."""
    before = report.count
    with_checks: list[str] = []
    for name, spec in services.items():
        test = healthcheck_test(spec)
        if test is None:
            continue
        with_checks.append(name)
        if isinstance(test, list) and (not test or test[0] not in ("CMD", "CMD-SHELL", "NONE")):
            report.fail(f"{name}: healthcheck test must start with CMD, CMD-SHELL or NONE, not {test[:1]}")
        elif isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) < 2:
            report.fail(f"{name}: healthcheck test has no command")
    if report.count == before:
        report.ok(f"healthcheck tests well-formed: {', '.join(with_checks) or '(none)'}")


def app_environments(services: Mapping[str, Spec]) -> dict[str, dict[str, str | None]]:
    """The environment of each app service present in the file."""
    return {name: environment(services[name]) for name in APP_SERVICES if name in services}


def check_shared_environment(envs: Mapping[str, Mapping[str, str | None]], report: Report) -> None:
    """The app services set the shared settings, and set them identically."""
    before = report.count
    for key in SHARED_REQUIRED + SHARED_OPTIONAL:
        values = {name: env.get(key) for name, env in envs.items()}
        if key in SHARED_REQUIRED:
            for name, value in values.items():
                if not value:
                    report.fail(f"{name}: environment has no {key}")
        if len(set(values.values())) > 1:
            shown = "; ".join(f"{n}={v!r}" for n, v in values.items())
            report.fail(f"{key} differs between app services: {shown}")
    if report.count == before:
        report.ok(f"app services {', '.join(envs)} share {', '.join(SHARED_REQUIRED + SHARED_OPTIONAL)}")


def check_url_hosts(
    services: Mapping[str, Spec], envs: Mapping[str, Mapping[str, str | None]], report: Report
) -> None:
    """The broker, backend and database URLs point at a service (or a real host name)."""
    before = report.count
    hosts: set[str] = set()
    for name, env in envs.items():
        for key in SHARED_REQUIRED:
            value = env.get(key)
            if not value:
                continue
            try:
                host = urlsplit(interpolate(value)).hostname
            except ValueError as exc:
                report.fail(f"{name}: {key} is not a URL ({exc})")
                continue
            if not host:
                report.fail(f"{name}: {key} has no host: {value!r}")
            elif host not in services and "." not in host and host != "localhost":
                report.fail(f"{name}: {key} points at {host!r}, which is not a service")
            else:
                hosts.add(host)
    if report.count == before:
        report.ok(f"broker/backend/database URLs point at services: {', '.join(sorted(hosts))}")


def check_document(doc: Spec, path: Path, report: Report) -> None:
    """Every check that reads the parsed file (all but the schema)."""
    services = services_of(doc)
    graph = dependency_graph(services)
    check_top_level(doc, services, report)
    check_depends_on(graph, report)
    check_healthy_targets(services, graph, report)
    check_restarts(services, graph, report)
    check_healthchecks(services, report)
    envs = app_environments(services)
    check_shared_environment(envs, report)
    check_url_hosts(services, envs, report)
    check_dockerfiles(path, services, report)


def check_file(path: Path, report: Report) -> Spec | None:
    """Parse and check the compose file at ``path``; the document, or None if it does not parse.

    Raises:
        CannotCheck: the file or the validator is missing.
    """
    if not path.is_file():
        raise CannotCheck(f"{path}: no such file")
    validator_version()
    print(f"check-compose: {path}")
    try:
        doc = load(path)
    except ComposeError as exc:
        report.fail(str(exc))
        return None
    report.ok(f"YAML parses: {len(doc['services'])} services ({', '.join(doc['services'])})")
    check_schema(path, report)
    check_document(doc, path, report)
    return doc


def summary(report: Report, label: str) -> int:
    """Print the verdict; the exit status (0 or 1)."""
    count = len(report.problems)
    if count:
        print(f"{label}: FAILED ({count} problem{'s' if count != 1 else ''})")
        return 1
    print(f"{label}: OK")
    return 0


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="check-compose", description=__doc__.split("\n", 1)[0])
    parser.add_argument("compose", nargs="?", type=Path, default=ROOT / "docker-compose.yml")
    parser.add_argument(
        "--start", action="store_true", help="also start each app service locally and fail if it exits"
    )
    parser.add_argument("--only", action="append", metavar="SERVICE", help="start only these services")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds a service without a healthcheck must stay up"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the file checks (and with ``--start`` the start check); the exit status."""
    args = _arguments(argv)
    report = Report()
    try:
        check_file(args.compose, report)
    except CannotCheck as exc:
        print(f"check-compose: {exc}", file=sys.stderr)
        return 2
    status = summary(report, "compose")
    if not args.start:
        return status
    from devtools.compose_run import run_start_check

    started = run_start_check(args.compose, only=args.only, settle=args.settle)
    return max(status, summary(started, "compose start"))


if __name__ == "__main__":
    sys.exit(main())
