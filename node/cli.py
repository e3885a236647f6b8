"""``transmural-node``: run a facility node from its config file.

    transmural-node serve --config node.toml [--insecure-dev] [--ready-file PATH]
                          [--log-file PATH] [--log-level LEVEL]

The ready file carries ``address`` (the peer port, mutual TLS) and
``gateway_address`` (the clinicians' port, TLS + bearer token).

SIGINT or SIGTERM stops the node gracefully (exit 0). A bad flag, an
unreadable or invalid config, a missing network key or an address that
cannot be bound is one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from node.config import NodeConfig
from node.server import NodeServer
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
PROG = "transmural-node"


async def serve(config: NodeConfig, ready_file: Path | None) -> None:
    node = NodeServer(config)

    async def start() -> dict[str, str]:
        await node.start()
        return {"address": node.address, "gateway_address": node.gateway_address}

    await serve_until_signalled(start, node.stop, ready_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="A Transmural facility node.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_command = commands.add_parser("serve", help="run the node until SIGINT or SIGTERM")
    serve_command.add_argument(
        "--config", type=given_path, required=True, metavar="PATH", help="node TOML config file"
    )
    serve_command.add_argument(
        "--insecure-dev",
        action="store_true",
        help="plain gRPC without certificates (development only; never between organisations)",
    )
    add_serve_arguments(serve_command)
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_file)
        config = NodeConfig.load(args.config, insecure_dev=args.insecure_dev)
        asyncio.run(serve(config, args.ready_file))
    except TransmuralError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"{PROG}: error: {error.strerror or error}: {error.filename or ''}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        log.exception("node failed")
        print(f"{PROG}: error: unexpected failure; see the log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
