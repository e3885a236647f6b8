"""Preparing bundle files for the store on every core, while this process writes.

Preparing a bundle (``node.ingest.prepare_bundle``: parse, validate,
convert, pseudonymise) is pure Python that holds the GIL, so a worker
*thread* overlaps it with SQLite writes only a little. For a folder of many
bundles the preparer starts worker *processes*: they prepare the next files
while this process writes the current one, which is what makes a large
ingest about twice as fast on two cores. A handful of files, or a
one-core machine, stays on a thread: starting a process (~0.2 s) would
cost more than it saves.

Workers are started with ``spawn`` (forking a process that may run gRPC
threads is unsafe) and are killed by the kernel if this process dies
outright, so an interrupted ingest leaves no orphans. They receive the
network key with each file to pseudonymise, over a pipe to our own child.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType

from node.records import BundleDraft
from transmural.errors import Unavailable
from transmural.process import end_with_parent
from transmural.pseudonym import Pseudonymiser

#: Fewer files than this are prepared on a thread (no process start-up cost).
MIN_FILES_FOR_PROCESSES = 8
#: At most this many worker processes, however many cores.
MAX_WORKERS = 4


def worker_count(files: int, cores: int | None = None) -> int:
    """How many worker processes ``files`` bundles deserve here; 0 means a thread."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if files < MIN_FILES_FOR_PROCESSES or cores < 2:
        return 0
    return min(cores, MAX_WORKERS)


class BundlePreparer:
    """``prepare_bundle`` for a run of files: in worker processes, or on a thread.

    Use as ``async with BundlePreparer(len(files)) as preparer``; ``ahead``
    says how many files to keep in preparation at once.
    """

    def __init__(self, files: int, workers: int | None = None) -> None:
        self.workers = worker_count(files) if workers is None else workers
        #: Files in preparation at once: one per worker, and one more ready to write.
        self.ahead = self.workers + 1 if self.workers else 1
        self._pool: Executor | None = None

    async def __aenter__(self) -> BundlePreparer:
        if self.workers:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=end_with_parent,
                initargs=(os.getpid(),),
            )
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    def prepare(
        self, path: Path, national_system: str, pseudonymiser: Pseudonymiser | None
    ) -> asyncio.Future[BundleDraft]:
        """Start preparing ``path``; its draft, or InvalidBundle saying why not."""
        return asyncio.ensure_future(self._prepared(path, national_system, pseudonymiser))

    async def _prepared(
        self, path: Path, national_system: str, pseudonymiser: Pseudonymiser | None
    ) -> BundleDraft:
        """The draft; a worker that died stops the ingest with an error naming the file.

        It is not the bundle's refusal: every later file would fail the same way.
        """
        from node.ingest import prepare_bundle  # ingest imports this module

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, prepare_bundle, path, national_system, pseudonymiser
            )
        except BrokenProcessPool:
            raise Unavailable(
                f"{path.name}: a worker process preparing bundles died (out of memory, or "
                "killed); the bundles written before it are in: run the same ingest again"
            ) from None
