"""Children started beside running gRPC: they reach their command, and die with us."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.conftest import NetworkFactory, collect
from transmural.process import dying_with_parent


async def test_commands_start_cleanly_while_grpc_is_busy_in_this_process(
    network: NetworkFactory,
) -> None:
    """A child forked to set its parent-death signal aborted now and then inside gRPC.

    The wrapper execs a fresh interpreter instead, so every child runs its
    command, however busy this process's gRPC threads are.
    """
    net = await network(n=1)
    client = net.client(0)
    searching = True

    async def search_meanwhile() -> None:
        while searching:
            await collect(client, "111222333")

    searches = [asyncio.create_task(search_meanwhile()) for _ in range(4)]

    def start_children() -> list[tuple[int, bytes]]:
        runs = [
            subprocess.run(dying_with_parent(["echo", "started"]), capture_output=True)
            for _ in range(40)
        ]
        return [(run.returncode, run.stdout + run.stderr) for run in runs]

    try:
        results = await asyncio.to_thread(start_children)
    finally:
        searching = False
        await asyncio.gather(*searches)
    assert [r for r in results if r != (0, b"started\n")] == []


@pytest.mark.parametrize(
    "module", ["node.server", "registry.server", "tools.admin", "tools.clinician"]
)
def test_every_entry_point_quiets_grpcs_handshake_chatter_before_grpc_loads(module: str) -> None:
    """grpc reads GRPC_VERBOSITY when it is imported: set later, every refused TLS
    handshake (a probe, a client without a certificate) is an INFO line on stderr."""
    environment = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    script = f"import {module}\n"
    # Where grpc was first imported, GRPC_VERBOSITY must already have been set.
    probe = (
        "import builtins, os\n"
        "real = builtins.__import__\n"
        "def watch(name, *a, **k):\n"
        "    if name == 'grpc' and 'grpc' not in __import__('sys').modules:\n"
        "        print('at grpc import:', os.environ.get('GRPC_VERBOSITY'))\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = watch\n" + script
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=environment,
        timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.splitlines()[0] == "at grpc import: ERROR", done.stdout
