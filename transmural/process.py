"""Running a server as a process: logging, ready file, signals.

A supervisor (devnet, compose, systemd) starts a server on port 0 and
learns the real address from the ready file, written atomically once the
server is serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path


def setup_logging(log_file: Path | None, level: str) -> None:
    """Log to ``log_file`` (or stderr) with time, level and module."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def write_ready_file(path: Path, address: str) -> None:
    """Write ``{"address", "pid"}`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    tmp.replace(path)


async def serve_until_signalled(
    start: Callable[[], Awaitable[str]],
    stop: Callable[[], Awaitable[None]],
    ready_file: Path | None,
) -> None:
    """Start, announce the address, wait for SIGINT/SIGTERM, stop."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    address = await start()
    if ready_file is not None:
        write_ready_file(ready_file, address)
    try:
        await stopping.wait()
    finally:
        await stop()
