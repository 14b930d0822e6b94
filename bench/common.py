"""What the benchmarks share: waiting for a condition, and asking Redis whether it is up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

T = TypeVar("T")


def ping(conn: redis.Redis) -> bool:
    """True once the Redis behind ``conn`` answers."""
    try:
        return bool(conn.ping())
    except redis.ConnectionError:
        return False


def wait(cond: Callable[[], T], timeout: float, what: str = "a condition") -> T:
    """Poll ``cond`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
