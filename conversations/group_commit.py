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
"""

import threading
from collections.abc import Callable

from django.db import DatabaseError, connection

from conversations.gateway import metrics


class _Item:
    __slots__ = ("payload", "order", "result", "error", "finished", "wake", "promoted")

    def __init__(self, payload: dict, order: tuple):
        self.payload = payload
        self.order = order
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = threading.Event()
        self.promoted = False

    def outcome(self) -> dict:
        if self.error is not None:
            raise self.error
        return self.result


def _server_rejected(exc: DatabaseError) -> bool:
    """The server answered with an error, so the statement (and its implicit
    transaction) was rolled back, and writing again cannot write twice."""
    return getattr(exc.__cause__, "sqlstate", None) is not None


class GroupCommit:
    def __init__(
        self, *, name: str, single: Callable[[dict], dict], batch: Callable[[list[dict]], list[dict]], max_batch: int = 64
    ):
        self.name = name
        self._single = single
        self._batch = batch
        self._max = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Item] = []
        self._leading = False

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
        while True:
            with self._lock:
                batch = self._queue[: self._max]
                del self._queue[: self._max]
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
                    it.wake.set()
