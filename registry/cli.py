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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from registry import const
from registry.server import RegistryServer
from transmural.errors import TransmuralError
from transmural.process import (
    EXIT_USAGE,
    OneLineParser,
    add_serve_arguments,
    configure_logging,
    serve_until_signalled,
)

log = logging.getLogger(__name__)

PROG = "transmural-registry"
EXIT_OK = 0
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="The Transmural registry.")
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
    add_serve_arguments(serve)
    return parser


async def serve(db: Path, listen: str, ready_file: Path | None) -> None:
    """Run a registry until SIGINT or SIGTERM, then stop it gracefully."""
    server = RegistryServer(db, listen)

    async def start() -> str:
        await server.start()
        return server.address

    await serve_until_signalled(
        start, lambda: server.stop(const.SHUTDOWN_GRACE_SECONDS), ready_file
    )


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
