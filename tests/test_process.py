"""Children started beside running gRPC: they reach their command, and die with us."""

from __future__ import annotations

import asyncio
import subprocess

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
