"""Concurrent reads share hops to SQLite, and none is lost when one fails or gives up."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from transmural.clock import SystemClock
from transmural.database import Database
from transmural.shared_read import SharedRead

SQUARES = "CREATE TABLE squares (n INTEGER PRIMARY KEY, square INTEGER NOT NULL);"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(
        tmp_path / "shared.db", [SQUARES], SystemClock(), owner="test", busy_timeout_ms=1_000
    )
    await database.run(
        "fill",
        lambda c: c.executemany(
            "INSERT INTO squares VALUES (?, ?)", [(n, n * n) for n in range(50)]
        ),
        write=True,
    )
    yield database
    await database.close()


class Squares:
    """Looks squares up, counting its hops; with ``permits`` each hop waits for one."""

    def __init__(self, permits: threading.Semaphore | None = None) -> None:
        self.permits = permits
        self.started = threading.Semaphore(0)  # released as each hop starts
        self.hops: list[int] = []  # how many questions each finished hop answered
        self.fail_next = False

    def __call__(self, db: sqlite3.Connection, questions: Sequence[int]) -> list[int | None]:
        self.started.release()
        if self.permits is not None:
            assert self.permits.acquire(timeout=10), "the test never let this hop through"
        self.hops.append(len(questions))
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        found = dict(db.execute("SELECT n, square FROM squares"))
        return [found.get(n) for n in questions]


async def next_hop_started(squares: Squares) -> None:
    assert await asyncio.to_thread(squares.started.acquire, True, 5), "no hop started"


async def test_each_caller_gets_its_own_answer_and_waiting_callers_share_a_hop(
    db: Database,
) -> None:
    permits = threading.Semaphore(0)
    squares = Squares(permits)
    read = SharedRead(db, "squares", squares)
    first = asyncio.create_task(read.ask(3))
    await next_hop_started(squares)  # held, so the rest pile up behind it
    rest = [asyncio.create_task(read.ask(n)) for n in (4, 5, 99, 4)]
    await asyncio.sleep(0.05)
    permits.release(2)
    assert await first == 9
    assert [await task for task in rest] == [16, 25, None, 16]
    assert squares.hops == [1, 4]


async def test_one_caller_alone_takes_one_hop(db: Database) -> None:
    squares = Squares()
    read = SharedRead(db, "squares", squares)
    assert [await read.ask(n) for n in (2, 7)] == [4, 49]
    assert squares.hops == [1, 1]


async def test_a_failed_hop_fails_everyone_in_it_and_the_next_one_works(db: Database) -> None:
    permits = threading.Semaphore(0)
    squares = Squares(permits)
    read = SharedRead(db, "squares", squares)
    first = asyncio.create_task(read.ask(1))
    await next_hop_started(squares)
    shared = [asyncio.create_task(read.ask(n)) for n in (2, 3)]
    await asyncio.sleep(0.05)
    permits.release()
    assert await first == 1
    squares.fail_next = True  # the second hop, shared by both, fails
    permits.release(2)
    for task in shared:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
            await task
    assert await read.ask(6) == 36
    assert squares.hops == [1, 2, 1]


async def test_a_caller_who_gives_up_mid_hop_does_not_strand_the_others(db: Database) -> None:
    permits = threading.Semaphore(0)
    squares = Squares(permits)
    read = SharedRead(db, "squares", squares)
    first = asyncio.create_task(read.ask(1))
    await next_hop_started(squares)
    leader, follower = (asyncio.create_task(read.ask(n)) for n in (8, 9))
    await asyncio.sleep(0.05)
    permits.release()
    assert await first == 1
    await next_hop_started(squares)  # the hop for 8 and 9 is under way: its leader gives up
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    permits.release(2)
    assert await asyncio.wait_for(follower, timeout=5) == 81
    assert squares.hops == [1, 2, 2]
