"""The gateway's event-loop stalls, as ``service.runtime.loopwatch`` logs them on SIGUSR1."""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

from bench.servers import Server

MAX_STALL_MS = 20.0

_STALLS = re.compile(
    rb"event loop stalls since last report: samples=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+) max_ms=([\d.]+)"
    rb".*? busy_p99_ms=([\d.]+) busy_max_ms=([\d.]+) gc_full=(\d+)"
)


@dataclass
class Stalls:
    """One window of the gateway's event-loop stall statistics."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: the same counting only the time the gateway's loop thread was running
    busy_p99_ms: float
    busy_max_ms: float
    #: full garbage collections in the window
    gc_full: int

    def text(self) -> str:
        return (
            f"p50 {self.p50_ms:.2f}, p99 {self.p99_ms:.2f}, max {self.max_ms:.2f} ms "
            f"(running: p99 {self.busy_p99_ms:.2f}, max {self.busy_max_ms:.2f} ms; "
            f"{self.gc_full} full GCs; {self.samples} samples)"
        )


def stall_report(server: Server, timeout: float = 10.0) -> Stalls | None:
    """SIGUSR1 the gateway and parse the stall line it logs (None if none appears in time)."""
    before = len(_STALLS.findall(server.log.read_bytes()))
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _STALLS.findall(server.log.read_bytes())
        if len(found) > before:
            samples, p50, p99, top, busy_p99, busy_max, gc_full = found[-1]
            return Stalls(
                samples=int(samples),
                p50_ms=float(p50),
                p99_ms=float(p99),
                max_ms=float(top),
                busy_p99_ms=float(busy_p99),
                busy_max_ms=float(busy_max),
                gc_full=int(gc_full),
            )
        time.sleep(0.05)
    return None
