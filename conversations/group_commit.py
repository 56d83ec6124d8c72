"""Group commit for the gateway's writes on Postgres.

Under load most of the database's time per request went to things done once
per transaction (the commit and its WAL flush, the function call, locking the
budget rows, the round trip), and the transactions of concurrent requests
queued on the same budget rows. Here the gateway's database threads share the
work: the first thread to arrive writes its request at once; requests arriving
while it writes wait and go together in the next transaction, written by one
of them. Nobody waits for a timer, so a lone request is written immediately,
and a request is answered only after the transaction holding it committed:
batching never acknowledges anything that is not durable.

If a batch fails with an error the server reported (a deadlock, a constraint),
nothing of it was committed, so each request is written again on its own and
only the one at fault fails. An error with no server verdict (the connection
dropped mid-commit) is passed to every request in the batch as it is, because
writing again might write twice.

Requests on the event loop (the gateway's own path) wait for their
transaction as asyncio futures instead (submit_async): while one job on a
database thread writes batch after batch, the requests waiting for the next
one hold no thread at all. With threads as the waiting room, the eight
database threads of a process were mostly parked behind a leader, and the
rest of the gateway's work queued 40-60 ms for a free thread at c=200.
"""

import asyncio
import contextlib
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import DatabaseError, connection

from conversations.gateway import metrics


class _Item:
    __slots__ = ("payload", "order", "result", "error", "finished", "wake", "promoted", "future")

    def __init__(self, payload: dict, order: tuple, future: asyncio.Future | None = None):
        self.payload = payload
        self.order = order
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = threading.Event()
        self.promoted = False
        self.future = future  # set when the request waits on the event loop

    def notify(self) -> None:
        if self.future is None:
            self.wake.set()
        else:
            self.future.get_loop().call_soon_threadsafe(_resolve, self)

    def outcome(self) -> dict:
        if self.error is not None:
            raise self.error
        return self.result


def _resolve(item: _Item) -> None:
    if item.future.cancelled():  # the request went away; what was written stays written
        return
    if item.error is not None:
        item.future.set_exception(item.error)
    else:
        item.future.set_result(item.result)


def _server_rejected(exc: DatabaseError) -> bool:
    """The server answered with an error, so the statement (and its implicit
    transaction) was rolled back, and writing again cannot write twice."""
    return getattr(exc.__cause__, "sqlstate", None) is not None


class GroupCommit:
    def __init__(
        self,
        *,
        name: str,
        single: Callable[[dict], dict],
        batch: Callable[[list[dict]], list[dict]],
        max_batch: int | None = None,
    ):
        self.name = name
        self._single = single
        self._batch = batch
        self._max_batch = max_batch  # None: settings.GATEWAY["GROUP_COMMIT_MAX_BATCH"], read when writing
        self._lock = threading.Lock()
        self._queue: list[_Item] = []
        self._leading = False
        self._waiting: list[_Item] = []  # requests on the event loop
        self._draining = False

    @property
    def _max(self) -> int:
        return max(1, self._max_batch or settings.GATEWAY["GROUP_COMMIT_MAX_BATCH"])

    async def submit_async(self, payload: dict, *, order: tuple = ()) -> dict:
        """From the event loop: the request waits for the transaction that
        writes it without holding a thread. One job on a database thread
        (started by the first request, ended when nobody waits) writes every
        waiting request in the next batch."""
        item = _Item(payload, order, asyncio.get_running_loop().create_future())
        with self._lock:
            self._waiting.append(item)
            start = not self._draining
            self._draining = True
        if start:
            self._start_writer()
        return await item.future

    def write_if_idle(self, payload: dict, *, order: tuple = ()) -> dict | None:
        """On a database thread: when nothing of this writer is being written
        or waited for, write the request here and now (a lone request costs no
        second hop to another thread); otherwise None, and the caller waits
        with submit_async. Requests that arrive meanwhile are handed to a
        writer job rather than written by this request."""
        with self._lock:
            if self._draining or self._leading or self._waiting or self._queue:
                return None
            self._draining = True
        item = _Item(payload, order)
        try:
            self._write([item], leader=item)
        finally:
            with self._lock:
                handoff = bool(self._waiting)
                self._draining = handoff
            if handoff:
                self._start_writer()
        return item.outcome()

    def _start_writer(self) -> None:
        from conversations.gateway.dbsection import start_in_pool

        try:
            start_in_pool(self._drain)
        except BaseException as exc:  # noqa: BLE001 - no writer: every waiting request fails with the reason
            self._fail_waiting(exc)

    def _drain(self) -> None:
        limit = self._max
        try:
            while True:
                with self._lock:
                    batch, self._waiting = self._waiting[:limit], self._waiting[limit:]
                    if not batch:
                        self._draining = False
                        return
                self._write(batch, leader=None)
        except BaseException as exc:  # noqa: BLE001 - nobody may be left waiting for a writer that stopped
            self._fail_waiting(exc)
            raise

    def _fail_waiting(self, exc: BaseException) -> None:
        with self._lock:
            left, self._waiting = self._waiting, []
            self._draining = False
        for it in left:
            it.error = exc
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                it.notify()

    def submit(self, payload: dict, *, order: tuple = ()) -> dict:
        if connection.in_atomic_block:
            # The caller's own transaction: nobody else's writes may join it.
            result = self._single(payload)
            metrics.DB_WRITES.labels(self.name, "alone").inc()
            return result
        item = _Item(payload, order)
        with self._lock:
            self._queue.append(item)
            lead = not self._leading
            self._leading = True
        if not lead:
            item.wake.wait()
            if not item.promoted:
                return item.outcome()
        self._lead(item)
        return item.outcome()

    def _lead(self, mine: _Item) -> None:
        limit = self._max
        while True:
            with self._lock:
                batch, self._queue = self._queue[:limit], self._queue[limit:]
            if batch:
                self._write(batch, leader=mine)
            with self._lock:
                if not self._queue:
                    self._leading = False
                    return
                if mine.finished:
                    # Served: the next waiter writes the rest, so this request
                    # is not held up writing everyone else's.
                    nxt = self._queue[0]
                    nxt.promoted = True
                    nxt.wake.set()
                    return

    def _write(self, batch: list[_Item], *, leader: _Item) -> None:
        batch.sort(key=lambda it: it.order)
        try:
            if len(batch) == 1:
                batch[0].result = self._single(batch[0].payload)
                metrics.DB_WRITES.labels(self.name, "alone").inc()
            else:
                try:
                    results = self._batch([it.payload for it in batch])
                except DatabaseError as exc:
                    if not _server_rejected(exc):
                        raise
                    for it in batch:
                        try:
                            it.result = self._single(it.payload)
                        except DatabaseError as one:
                            it.error = one
                    metrics.DB_WRITES.labels(self.name, "retried_alone").inc(len(batch))
                else:
                    metrics.DB_BATCHES.labels(self.name).inc()
                    metrics.DB_WRITES.labels(self.name, "batched").inc(len(batch))
                    for it, result in zip(batch, results, strict=True):
                        it.result = result
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter, re-raised in each request
            for it in batch:
                if it.result is None and it.error is None:
                    it.error = exc
        finally:
            for it in batch:
                it.finished = True
                if it is not leader:
                    it.notify()
