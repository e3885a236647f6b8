"""``transmural-node``: run a facility node from its config file."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from node.config import NodeConfig
from node.server import NodeServer
from transmural.errors import TransmuralError
from transmural.process import serve_until_signalled, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="transmural-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the node until SIGINT/SIGTERM")
    serve.add_argument("--config", type=Path, required=True, help="node TOML config file")
    serve.add_argument("--ready-file", type=Path, help="write {address, pid} here once serving")
    serve.add_argument("--log-file", type=Path, help="log here instead of stderr")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args(argv)
    setup_logging(args.log_file, args.log_level)
    try:
        config = NodeConfig.load(args.config)
        node = NodeServer(config)

        async def start() -> str:
            await node.start()
            return node.address

        asyncio.run(serve_until_signalled(start, node.stop, args.ready_file))
    except TransmuralError as error:
        print(f"transmural-node: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"transmural-node: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
