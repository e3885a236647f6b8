"""One running server per database.

A second ``transmural-node serve`` on the same config would register the
same node id at another address and, when it exits, leave the network
pointing at a dead endpoint. A second registry on the same database would
answer half of the network with revocations and invites the other never
reloads at the same moment, and bind ports a client cannot tell apart. An
advisory lock beside the database stops either at start-up with a message
naming the process that holds it. The admin CLIs do not take the lock:
ingest, invite and revoke next to a running server are expected.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from transmural.errors import ConfigError


class ServerLock:
    """An exclusive ``flock`` on a file beside the database, held while a server runs."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def beside(cls, database: Path, server: str) -> ServerLock:
        """The lock for ``database`` (``<database>.lock``); ``server`` names it in errors."""
        real = database.resolve()  # a symlink or another spelling of the path is the same file
        try:
            return cls.acquire(real.with_name(real.name + ".lock"), server)
        except FileNotFoundError:
            raise ConfigError(
                f"cannot open {server} database {database}: the folder {database.parent} "
                "does not exist"
            ) from None

    @classmethod
    def acquire(cls, path: Path, server: str = "server") -> ServerLock:
        """Hold ``path``'s lock; ConfigError naming the holder's pid if it is taken.

        FileNotFoundError (the folder is missing) is left to the caller, who
        knows which database the folder was meant for.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise ConfigError(f"cannot create the lock file {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"this {server} is already running (pid {holder} holds {path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
