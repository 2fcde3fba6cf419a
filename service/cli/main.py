"""The ``taskgate`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from service.cli import tasks as commands_for_people
from service.config import Settings
from service.store.migrate import SchemaNotCurrent, upgrade

log = logging.getLogger("taskgate")


def _setup_logging(level: str) -> None:
    # the format uses none of these: skip collecting them for every record (the logging
    # HOWTO's "Optimization" section; it is a tenth of an Enqueue's CPU with the audit line)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _serve(settings: Settings) -> int:
    from service.api.server import serve

    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except SchemaNotCurrent as exc:
        log.error("%s", exc)
        return 2
    return 0


def _migrate(settings: Settings) -> int:
    upgrade(settings.database_url)
    log.info("database schema is current")
    return 0


def _dev(settings: Settings) -> int:
    from service.cli.dev import run

    return run(settings)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taskgate`` console script."""
    parser = argparse.ArgumentParser(prog="taskgate", description="gRPC front door to Celery")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (needs a migrated database)")
    commands.add_parser("migrate", help="create the database if needed and apply migrations")
    commands.add_parser("dev", help="run a private Redis, SQLite, one worker and the server until Ctrl-C")
    commands_for_people.add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in ("enqueue", "status", "watch"):
        return commands_for_people.run(args)
    settings = Settings()
    _setup_logging(settings.log_level)
    handlers = {"serve": _serve, "migrate": _migrate, "dev": _dev}
    return handlers[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
