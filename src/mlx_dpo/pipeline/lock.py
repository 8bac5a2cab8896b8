"""One writer per cache directory. The lock is an flock on CACHE/.lock, which the kernel releases
when its holder dies (even by kill -9), so a crashed run never leaves the cache locked; the file
names the holder (pid, host, start time) for the message the second writer gets."""

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"


@contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Hold the write lock on `directory` or raise a UserError naming the live holder."""
    path = Path(directory) / LOCK_NAME
    fd = _acquire(path)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before releasing, so a waiter never locks a dead file
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise UserError(
                f"{path.parent}: another mlx-dpo precompute is writing this cache ({holder}); "
                "wait for it to finish: a rerun then reuses its cache"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file while we waited on it: lock the new one


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
