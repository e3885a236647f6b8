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
from collections.abc import Awaitable, Callable, Sequence
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


#: Run as ``python -c`` before the real command: ask for SIGTERM when the
#: parent (argv[1]) dies, then become the command (the signal survives exec).
_EXEC_DYING_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM.value, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent gone before the command started")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(command: Sequence[str]) -> list[str]:
    """``command`` made to get SIGTERM when this process dies (Linux; as is elsewhere).

    Without it a SIGKILLed devnet, bench or pytest leaves its servers running
    for ever. A ``preexec_fn`` cannot do it here: Python then forks the whole
    process, and a child forked from one running gRPC aborts now and then
    before it reaches exec ("ev_epoll1_linux ... Check failed"). So a small
    interpreter (``-I -S``: no site, no environment) sets the signal and
    execs the command, and the process is still the command's own.
    """
    if _prctl() is None:
        return list(command)
    return [
        sys.executable, "-I", "-S", "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *command
    ]  # fmt: skip


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


def given_path(text: str) -> Path:
    """A path from the command line (argparse ``type``): an empty one is an error.

    ``Path("")`` is the current folder, so ``--data "$DATA"`` with DATA unset
    would quietly work on whatever folder the command was started in.
    """
    if not text:  # (" " is a name a file may have)
        raise argparse.ArgumentTypeError("the path is empty (an unset variable?)")
    return Path(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every Transmural CLI error is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags every server's ``serve`` command takes."""
    serve.add_argument(
        "--ready-file",
        type=given_path,
        metavar="PATH",
        help='write {"address", "pid"} as JSON here once serving',
    )
    serve.add_argument(
        "--log-file", type=given_path, metavar="PATH", help="append logs here instead of stderr"
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
