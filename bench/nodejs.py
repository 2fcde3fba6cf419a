"""The benchmark's Node programs (``bench/node/``): the Enqueue load generator and the stream client.

Both use @grpc/grpc-js, installed by ``make bench`` (``npm install --prefix bench/node``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

NODE_DIR = Path(__file__).parent / "node"


def require_node() -> str:
    """The ``node`` executable, once the Node packages are installed.

    Raises:
        RuntimeError: node, or the Node packages, are not installed.
    """
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        raise RuntimeError(
            "the benchmark's Node programs need node and `npm install --prefix bench/node` "
            "(`make bench` runs it)"
        )
    return node


def node_command(script: str, *args: str) -> list[str]:
    """``node bench/node/<script> <args>`` (raises as ``require_node``)."""
    return [require_node(), str(NODE_DIR / script), *args]
