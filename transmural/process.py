"""Running a server as a process: logging, ready file, signals, usage errors.

A supervisor (devnet, compose, systemd) starts a server on port 0 and
learns the real address from the ready file, written atomically once the
server is serving and removed again on a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

from transmural.errors import ConfigError

EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Libraries that would log every statement's parameters (pseudonyms) at DEBUG.
QUIET_LIBRARIES = ("aiosqlite", "grpc", "asyncio")


#: prctl(2) option: a signal the kernel sends the child when its parent dies.
_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, else None (elsewhere children may outlive a killed parent)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGTERM when we die; None off Linux.

    Without it a SIGKILLed devnet, bench or pytest leaves its servers running
    for ever. libc is looked up here, in the parent, so the child (forked from
    a process that may run gRPC threads) only makes one C call before exec.
    The pid check closes the race where we died before the prctl took effect.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM.value, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def end_with_parent(parent: int) -> None:
    """In a worker process (a pool's initializer): be killed when ``parent`` dies.

    A pool's workers wait on a queue the parent would feed; if the parent is
    killed outright they would wait for ever. The kernel ties the signal to
    the parent *thread* that started us, so start workers from one that lasts.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL.value, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every Transmural CLI error is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags every server's ``serve`` command takes."""
    serve.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help='write {"address", "pid"} as JSON here once serving',
    )
    serve.add_argument(
        "--log-file", type=Path, metavar="PATH", help="append logs here instead of stderr"
    )
    serve.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help="default INFO"
    )


def configure_logging(level: str, log_file: Path | None) -> None:
    """Send logs to ``log_file`` (or stderr); OSError if the file cannot be opened.

    Libraries that trace every call at DEBUG stay at INFO even then: aiosqlite
    would write each statement with its parameters into the log.
    """
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def write_ready_file(path: Path, address: str, **more: str) -> None:
    """Write the ready file so a reader never sees it half-written (tmp + rename).

    ``more`` adds the server's other addresses (e.g. ``join_address``).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text = json.dumps({"address": address, **more, "pid": os.getpid()})
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the ready file {path}: {exc.strerror or exc}") from exc


async def serve_until_signalled(
    start: Callable[[], Awaitable[str | dict[str, str]]],
    stop: Callable[[], Awaitable[None]],
    ready_file: Path | None,
) -> None:
    """Start, announce the address(es), wait for SIGINT/SIGTERM, stop, withdraw them.

    ``start`` returns the address, or a dict with ``address`` and others.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    started = await start()
    addresses = {"address": started} if isinstance(started, str) else started
    try:
        if ready_file is not None:
            await asyncio.to_thread(write_ready_file, ready_file, **addresses)
        await stopping.wait()
        logging.getLogger(__name__).info("stop requested")
    finally:
        await stop()
        if ready_file is not None:
            await asyncio.to_thread(ready_file.unlink, missing_ok=True)
