"""Reads that arrive together go to SQLite together, in one hop.

Every read is a hop to the database's worker thread and back, and on a busy
server that hop (waking the thread, waking the event loop again) costs more
CPU than the point lookup itself. A ``SharedRead`` lets concurrent callers
share it: the first caller runs a query for everyone waiting, and callers who
arrive while that hop is on its way wait for the next one, which answers all
of them at once. One caller alone still gets one hop and no added wait.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from transmural.database import Database

Question = TypeVar("Question")
Answer = TypeVar("Answer")

#: ``answer_all(connection, questions)``: one answer per question, in order.
AnswerAll = Callable[[sqlite3.Connection, Sequence[Question]], Sequence[Answer]]


class SharedRead(Generic[Question, Answer]):
    """One named read whose concurrent callers share hops to the database."""

    def __init__(
        self, database: Database, name: str, answer_all: AnswerAll[Question, Answer]
    ) -> None:
        self._database = database
        self._name = name
        self._answer_all = answer_all
        self._waiting: list[tuple[Question, asyncio.Future[Answer]]] = []
        self._turn = asyncio.Lock()

    async def ask(self, question: Question) -> Answer:
        """The answer to ``question``, perhaps read together with others'."""
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((question, answer))
        async with self._turn:
            if not answer.done():
                await self._answer_waiting()
        return answer.result()

    async def _answer_waiting(self) -> None:
        """Answer everyone waiting in one hop; a failure is every waiter's failure."""
        batch, self._waiting = self._waiting, []
        questions = [question for question, _ in batch]
        try:
            answers = await self._database.run(
                self._name, lambda db: self._answer_all(db, questions), write=False
            )
            if len(answers) != len(batch):
                raise RuntimeError(f"{self._name}: {len(answers)} answers to {len(batch)} asked")
        except asyncio.CancelledError:
            # Only this caller gave up: the others wait for the next turn.
            self._waiting[:0] = [entry for entry in batch if not entry[1].done()]
            raise
        except Exception as exc:
            answers = None
            failure = exc
        for index, (_, waiter) in enumerate(batch):
            if waiter.done():
                continue
            if answers is None:
                waiter.set_exception(failure)
            else:
                waiter.set_result(answers[index])
