"""Is a port free, and if not, which process holds it: said before a stack fails on it."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from .errors import StackError

LISTEN = "0A"


def holder(port: int) -> str | None:
    """``pid 1234 (python -m assayer dashboard)`` for the process listening on TCP ``port``, if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid} ({cmd.strip()[:120]})"
    return "a process this user cannot see (another user's, or another container's)"


def require_free(port: int, host: str, what: str, fix: str) -> None:
    """Raise a StackError naming the holder when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As the servers themselves do: connections of a stopped server in TIME_WAIT do not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StackError(f"port {port} for {what} is taken by {holder(port) or 'another process'}", fix) from None
