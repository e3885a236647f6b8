"""One running node per database.

A second ``transmural-node serve`` on the same config would register the
same node id at another address and, when it exits, leave the network
pointing at a dead endpoint. An advisory lock beside the database stops it
at start-up with a message naming the process that holds it. The admin CLI
does not take the lock: ingest next to a running node is expected.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from transmural.errors import ConfigError


class NodeLock:
    """An exclusive ``flock`` on a file, held while the node runs."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> NodeLock:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ConfigError(f"cannot create the lock file {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"this node is already running (pid {holder} holds {path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
