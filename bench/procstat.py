"""What a process holds, read from /proc: resident memory and its TCP connections to a port."""

from __future__ import annotations

import os
from pathlib import Path

import redis


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KB (VmRSS); 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_connections(pid: int, remote_port: int) -> list[int]:
    """Local ports of ``pid``'s established TCP connections to ``remote_port`` (any address).

    /proc/<pid>/net/tcp lists every socket of the network namespace, so the rows are matched
    to the process by the socket inodes among its open file descriptors.
    """
    mine = _socket_inodes(pid)
    local_ports = []
    for name in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == "01" and inode in mine and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                local_ports.append(int(local.rsplit(":", 1)[1], 16))
    return sorted(local_ports)


def redis_clients_by_port(client: redis.Redis, local_ports: list[int]) -> list[str]:
    """The CLIENT LIST names of the Redis connections coming from ``local_ports`` ('' = unnamed)."""
    wanted = set(local_ports)
    names = []
    for entry in client.client_list():
        port = int(str(entry.get("addr", ":0")).rsplit(":", 1)[1])
        if port in wanted:
            names.append(str(entry.get("name", "")))
    return sorted(names)
