"""The "naive gateway": ``python -m bench.naive``, a grpc.aio server whose Enqueue publishes directly.

No database, no outbox, no validation: the handler converts the arguments and calls
``send_task`` on a thread (``asyncio.to_thread``) with the gateway's send-only Celery app.
It prints ``naive listening on HOST:PORT`` once it serves, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from celery import Celery
from grpc import aio

from service.api import convert
from service.broker.publisher import send_only_app
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.worker.contract import CelerySettings


class NaiveServicer(pb_grpc.TaskServiceServicer):
    """Implements Enqueue only (the other methods answer UNIMPLEMENTED)."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    async def Enqueue(  # noqa: N802
        self, request: pb.EnqueueRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EnqueueResponse:
        result = await asyncio.to_thread(
            self._app.send_task,
            request.task_name,
            args=convert.from_list_value(request.args),
            kwargs=convert.from_struct(request.kwargs),
        )
        return pb.EnqueueResponse(task_id=result.id, state=pb.TASK_STATE_QUEUED)


async def serve(listen: str) -> None:
    app = send_only_app(CelerySettings())
    server = aio.server()
    servicer = NaiveServicer(app)  # type: ignore[abstract]  # Enqueue only, on purpose
    pb_grpc.add_TaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"naive listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(2)
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
