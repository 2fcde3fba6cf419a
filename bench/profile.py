"""A py-spy profile of the taskgate gateway process under the throughput load."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.infra import OUT, Children, announce, python_env
from bench.plan import Plan
from bench.servers import Server

_LINE_NO = re.compile(r":\d+\)$")
_SITE = re.compile(r"^.*?/(site-packages|lib/python3\.\d+)/")
#: Frames on (nearly) every stack, left out of the "total" list: they say nothing.
_PLUMBING = (
    "(threading.py", "(<frozen runpy>", "(asyncio/base_events.py", "(asyncio/runners.py",
    "(asyncio/events.py", "(service/__main__.py", "(service/cli/main.py", "(concurrent/futures/thread.py",
)  # fmt: skip


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (file path without line or site-packages)``."""
    frame = _LINE_NO.sub(")", frame.strip())
    name, _, where = frame.partition(" (")
    return f"{name} ({_SITE.sub('', where)}" if where else name


def top_functions(raw: str, limit: int = 10) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) output: samples, top by own samples, top by total samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_function(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] += count
        for function in set(frames):
            if not any(marker in function for marker in _PLUMBING):
                total[function] += count
    return samples, own.most_common(limit), total.most_common(limit)


def profile_taskgate(plan: Plan, children: Children, server: Server) -> str:
    """Profile ``server`` for ``plan.profile_seconds`` while a load generator keeps 64 calls in flight."""
    heading = f"## py-spy: taskgate gateway process under {plan.throughput_concurrency} in flight"
    py_spy = find_py_spy()
    if py_spy is None:
        return f"{heading}\n\npy-spy is not installed (pip install py-spy); skipped."
    output = OUT / "profile.txt"
    output.unlink(missing_ok=True)
    log = OUT / "py-spy.log"
    log.write_bytes(b"")
    load_command = [
        sys.executable, "-m", "bench.loadgen", "--target", server.target,
        "--concurrency", str(plan.throughput_concurrency), "--warmup", "0",
        "--duration", str(plan.profile_seconds + 4), "--channels", str(plan.channels),
    ]  # fmt: skip
    load = children.spawn(load_command, log=OUT / "loadgen-profile.log", env=python_env(), stdout_pipe=True)
    try:
        time.sleep(2)
        announce(f"py-spy record -d {plan.profile_seconds:g} --pid {server.pid}")
        spy_command = [
            py_spy, "record", "-o", str(output), "--format", "raw",
            "-d", str(max(1, round(plan.profile_seconds))), "--pid", str(server.pid),
        ]  # fmt: skip
        spy = children.spawn(spy_command, log=log)
        try:
            code = spy.wait(timeout=plan.profile_seconds + 60)
        except subprocess.TimeoutExpired:
            code = -1
        children.stop(spy)
        load.communicate(timeout=plan.profile_seconds + 60)
    finally:
        children.stop(load)
    if code != 0 or not output.exists():
        why = log.read_text(errors="replace").strip()[-800:]
        return f"{heading}\n\npy-spy could not profile the gateway (exit {code}): {why}"
    samples, own, total = top_functions(output.read_text(errors="replace"))
    lines = [heading, "", f"{samples} samples (raw stacks in {output.relative_to(OUT.parent.parent)})", ""]
    lines.append("top 10 by own samples (where the time is spent):")
    lines += [f"  {count / samples:6.1%}  {function}" for function, count in own]
    lines += ["", "top 10 by total samples (function anywhere on the stack; thread/loop plumbing left out):"]
    lines += [f"  {count / samples:6.1%}  {function}" for function, count in total]
    return "\n".join(lines)
