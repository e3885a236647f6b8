"""``transmural-registry``: run the registry from a shell, a supervisor or a container.

    transmural-registry serve --db PATH [--listen HOST:PORT] [--ready-file PATH]
                              [--log-file PATH] [--log-level LEVEL]

A supervisor that starts the registry on port 0 learns the real address from
the ready file, written atomically once the server is serving as JSON
``{"address": "127.0.0.1:PORT", "pid": PID}`` and removed again on a clean
stop. SIGINT or SIGTERM stops the server gracefully (exit 0). A bad flag, an
unusable database or an address that cannot be bound is one line on stderr
and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from registry import const
from registry.server import RegistryServer
from transmural.errors import ConfigError, TransmuralError

log = logging.getLogger(__name__)

PROG = "transmural-registry"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("aiosqlite", "grpc", "asyncio")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every Transmural CLI error is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The Transmural registry.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the registry until SIGINT or SIGTERM")
    serve.add_argument(
        "--db", type=Path, required=True, metavar="PATH", help="SQLite database (created if new)"
    )
    serve.add_argument(
        "--listen",
        default=const.DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free one (default %(default)s)",
    )
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
    return parser


def configure_logging(level: str, log_file: Path | None) -> None:
    """Send logs to ``log_file`` (or stderr); OSError if the file cannot be opened.

    Libraries that trace every call at DEBUG stay at INFO even then: aiosqlite
    would write each statement with its parameters, i.e. whole batches of
    pseudonyms, into the log.
    """
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def write_ready_file(path: Path, address: str) -> None:
    """Write the ready file so a reader never sees it half-written (tmp + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the ready file {path}: {exc.strerror or exc}") from exc


async def serve(db: Path, listen: str, ready_file: Path | None) -> None:
    """Run a registry until SIGINT or SIGTERM, then stop it gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    server = RegistryServer(db, listen)
    await server.start()
    try:
        if ready_file is not None:
            await asyncio.to_thread(write_ready_file, ready_file, server.address)
        await stopping.wait()
        log.info("stop requested; stopping the registry")
    finally:
        await server.stop(const.SHUTDOWN_GRACE_SECONDS)
        if ready_file is not None:
            await asyncio.to_thread(ready_file.unlink, missing_ok=True)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_file)
    except OSError as exc:
        return _fail(f"cannot open log file {args.log_file}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        asyncio.run(serve(args.db, args.listen, args.ready_file))
    except TransmuralError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_USAGE)
    except Exception:
        log.exception("registry failed")
        return _fail("unexpected failure; see the log", EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
