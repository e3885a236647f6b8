"""``transmural-registry``: run the registry from a shell, a supervisor or a container.

    transmural-registry serve --db PATH (--network-dir DIR | --insecure-dev)
                              [--listen HOST:PORT] [--join-listen HOST:PORT]
                              [--advertise-on ADDR ...] [--ready-file PATH]
                              [--log-file PATH] [--log-level LEVEL]

With ``--network-dir`` (made by ``transmural-admin network init``) the
registry serves nodes on a mutual-TLS port and joining nodes on a join port.
``--insecure-dev`` is plain gRPC on one port with no enrolment: for
development only, never between organisations.

A supervisor that starts the registry on port 0 learns the real addresses
from the ready file, written atomically once the server is serving as JSON
``{"address": "127.0.0.1:PORT", "join_address": "127.0.0.1:PORT", "pid": PID}``
(no ``join_address`` under ``--insecure-dev``) and removed again on a clean
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

from registry import const
from registry.server import RegistryServer
from transmural.errors import TransmuralError
from transmural.process import (
    EXIT_USAGE,
    OneLineParser,
    add_serve_arguments,
    configure_logging,
    given_path,
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
        "--db",
        type=given_path,
        required=True,
        metavar="PATH",
        help="SQLite database (created if new)",
    )
    serve.add_argument(
        "--network-dir",
        type=given_path,
        metavar="DIR",
        help="the network folder made by `transmural-admin network init` (CA, keys)",
    )
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="serve plain gRPC without certificates or enrolment (development only)",
    )
    serve.add_argument(
        "--listen",
        default=const.DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address of the (mutual-TLS) registry port; port 0 picks a free one "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--join-listen",
        default=const.DEFAULT_JOIN_LISTEN,
        metavar="HOST:PORT",
        help="address of the join port (TLS, invite token instead of a client certificate); "
        "port 0 picks a free one (default %(default)s)",
    )
    serve.add_argument(
        "--advertise-on",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="advertise the join port with zeroconf on these interface addresses "
        "(default: not advertised)",
    )
    add_serve_arguments(serve)
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Run a registry until SIGINT or SIGTERM, then stop it gracefully."""
    server = RegistryServer(
        args.db,
        args.listen,
        args.join_listen,
        network_dir=None if args.insecure_dev else args.network_dir,
        advertise_interfaces=args.advertise_on,
    )

    async def start() -> dict[str, str]:
        await server.start()
        if server.join_address is None:
            return {"address": server.address}
        return {"address": server.address, "join_address": server.join_address}

    await serve_until_signalled(
        start, lambda: server.stop(const.SHUTDOWN_GRACE_SECONDS), args.ready_file
    )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.network_dir is None) == (not args.insecure_dev):
        parser.error("give exactly one of --network-dir DIR or --insecure-dev")
    try:
        configure_logging(args.log_level, args.log_file)
    except OSError as exc:
        return _fail(f"cannot open log file {args.log_file}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        asyncio.run(serve(args))
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
