"""The ``taskgate`` command line.

``serve`` and ``migrate`` exit with status 2 and one line on stderr when the database or
Redis is missing or unreachable (``service.cli.startup``); the people-facing commands are in
``service.cli.tasks``. ``--target`` (env ``TASKGATE_TARGET``) may come before or after the
sub-command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from service.cli import control, operations, schedules, startup, workflows
from service.cli import tasks as commands_for_people
from service.config import Settings
from service.runtime import logs, tracing
from service.store.migrate import upgrade

log = logging.getLogger("taskgate")

#: Exit status when a dependency is missing or unreachable at start.
CANNOT_START = 2


def _setup_logging(settings: Settings) -> None:
    logs.setup(settings.log_level, settings.log_format)


def _cannot_start(command: str, message: str) -> int:
    sys.stderr.write(f"taskgate {command}: {message}\n")
    sys.stderr.flush()
    return CANNOT_START


def _serve(settings: Settings) -> int:
    try:
        asyncio.run(startup.preflight(settings))
    except startup.StartupProblem as exc:
        return _cannot_start("serve", str(exc))
    from service.app import serve  # after the checks: it imports Celery, gRPC and the workers

    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    tracing.configure()  # only when OTEL_* variables ask for it
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except Exception as exc:
        message = startup.problem_of(exc, settings)
        if message is None:
            raise
        return _cannot_start("serve", message)
    finally:
        tracing.shutdown()
    return 0


def _migrate(settings: Settings) -> int:
    try:
        startup.check_reachable(settings.database_url)
        upgrade(settings.database_url)
    except Exception as exc:
        message = startup.problem_of(exc, settings, serving=False)
        if message is None:
            raise
        return _cannot_start("migrate", message)
    log.info("database schema is current")
    return 0


def _dev(settings: Settings) -> int:
    from service.cli.dev import run

    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    """The ``taskgate`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="taskgate", description="gRPC front door to Celery")
    commands_for_people.add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the gRPC server (needs a migrated database)")
    commands.add_parser("migrate", help="create the database if needed and apply migrations")
    commands.add_parser("dev", help="run a private Redis, SQLite, one worker and the server until Ctrl-C")
    commands_for_people.add_parsers(commands)
    control.add_parsers(commands, commands_for_people._target_after_command())
    schedules.add_parsers(commands, commands_for_people._target_after_command())
    operations.add_parsers(commands, commands_for_people._target_after_command())
    workflows.add_parsers(commands, commands_for_people._target_after_command())
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taskgate`` console script."""
    args = build_parser().parse_args(argv)
    if args.command in commands_for_people.COMMANDS:
        return commands_for_people.run(args)
    if args.command in control.COMMANDS:
        return control.run(args)
    if args.command in schedules.COMMANDS:
        return schedules.run(args)
    if args.command in operations.COMMANDS:
        return operations.run(args)
    if args.command in workflows.COMMANDS:
        return workflows.run(args)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _cannot_start(args.command, f"unusable settings: {problems}")
    _setup_logging(settings)
    handlers = {"serve": _serve, "migrate": _migrate, "dev": _dev}
    return handlers[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
