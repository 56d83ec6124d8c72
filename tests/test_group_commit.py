"""Group commit: requests that reach the database while another is being
written share the next transaction, each gets its own result, and a bad one
does not take the others down with it."""

import threading
import time
from decimal import Decimal
from types import SimpleNamespace

import psycopg
import pytest
from django.db import DatabaseError, connection, transaction

from conversations import recording_sql
from conversations.group_commit import GroupCommit, _Item
from conversations.models import Conversation, Message, ProviderCall
from governance.services import create_api_key
from tests.factories import make_application, make_model


def _server_error(sqlstate: str | None) -> DatabaseError:
    """Django's error as it wraps psycopg's: with the server's SQLSTATE, or
    none when the connection itself failed."""
    err = DatabaseError("rejected")
    err.__cause__ = psycopg.errors.ForeignKeyViolation("fk") if sqlstate else psycopg.OperationalError("connection lost")
    assert err.__cause__.sqlstate == sqlstate
    return err


class Recorder:
    """Stands in for the two SQL functions: records what each write got."""

    def __init__(self, *, hold_first: bool = True, batch_error: DatabaseError | None = None, bad: set[int] = frozenset()):
        self.started, self.release = threading.Event(), threading.Event()
        self.hold_first = hold_first
        self.batch_error = batch_error
        self.bad = bad
        self.singles, self.batches = [], []

    def single(self, payload):
        self.singles.append(payload["n"])
        if self.hold_first and len(self.singles) == 1:
            self.started.set()
            assert self.release.wait(5)
        if payload["n"] in self.bad:
            raise _server_error("23503")
        return {"echo": payload["n"], "how": "alone"}

    def batch(self, payloads):
        self.batches.append([p["n"] for p in payloads])
        if self.batch_error is not None:
            raise self.batch_error
        return [{"echo": p["n"], "how": "batched"} for p in payloads]


def _run_burst(writer: GroupCommit, recorder: Recorder, n: int = 5) -> dict:
    """One write in flight, then `n` more arrive while it is written."""
    results = {}

    def go(i, order):
        try:
            results[i] = writer.submit({"n": i}, order=(order,))
        except DatabaseError as exc:
            results[i] = exc

    first = threading.Thread(target=go, args=(0, 0))
    first.start()
    assert recorder.started.wait(5)
    others = [threading.Thread(target=go, args=(i, 100 - i)) for i in range(1, n + 1)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 5
    while len(writer._queue) < n and time.monotonic() < deadline:
        time.sleep(0.001)
    recorder.release.set()
    for t in [first, *others]:
        t.join(5)
        assert not t.is_alive()
    return results


def test_writes_arriving_meanwhile_share_one_transaction_in_lock_order():
    rec = Recorder()
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    results = _run_burst(writer, rec)
    assert rec.batches == [[5, 4, 3, 2, 1]]  # one shared write, ordered by the items' lock order
    assert results[0] == {"echo": 0, "how": "alone"}  # the first was not held back for the others
    assert all(results[i] == {"echo": i, "how": "batched"} for i in range(1, 6))
    assert not writer._leading and not writer._queue


def test_the_largest_batch_is_a_setting(settings):
    """GATEWAY_GROUP_COMMIT_MAX_BATCH caps how many waiting writes one
    transaction takes; the rest go in the next ones, in the same order."""
    settings.GATEWAY = {**settings.GATEWAY, "GROUP_COMMIT_MAX_BATCH": 2}
    rec = Recorder()
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    results = _run_burst(writer, rec)
    assert [len(b) for b in rec.batches] == [2, 2] and len(rec.singles) == 2  # the first, then 2 + 2 + 1
    assert sorted([*sum(rec.batches, []), *rec.singles]) == [0, 1, 2, 3, 4, 5]  # each written once
    assert all(b == sorted(b, reverse=True) for b in rec.batches)  # lock order within each transaction
    assert all(results[i]["echo"] == i for i in range(6))


def test_a_lone_write_goes_at_once():
    rec = Recorder(hold_first=False)
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    assert writer.submit({"n": 7}) == {"echo": 7, "how": "alone"}
    assert rec.batches == []


def test_a_rejected_batch_is_written_again_one_by_one_and_only_the_bad_one_fails():
    rec = Recorder(batch_error=_server_error("23503"), bad={3})
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    results = _run_burst(writer, rec)
    assert len(rec.batches) == 1
    assert sorted(rec.singles) == [0, 1, 2, 3, 4, 5]
    assert isinstance(results[3], DatabaseError)
    assert all(results[i] == {"echo": i, "how": "alone"} for i in (0, 1, 2, 4, 5))


def test_a_batch_lost_without_a_server_verdict_is_not_written_twice():
    """The connection dropped: the batch may have committed, so nobody writes
    it again; every request in it sees the error (and answers 503)."""
    lost = _server_error(None)
    rec = Recorder(batch_error=lost)
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    results = _run_burst(writer, rec)
    assert rec.singles == [0]
    assert all(results[i] is lost for i in range(1, 6))
    assert results[0] == {"echo": 0, "how": "alone"}


def test_an_unexpected_error_reaches_every_waiter_instead_of_hanging_them():
    rec = Recorder(batch_error=None)
    boom = RuntimeError("bug")

    def batch(payloads):
        raise boom

    writer = GroupCommit(name="test", single=rec.single, batch=batch)
    results = {}

    def go(i):
        try:
            results[i] = writer.submit({"n": i}, order=(i,))
        except RuntimeError as exc:
            results[i] = exc

    first = threading.Thread(target=go, args=(0,))
    first.start()
    assert rec.started.wait(5)
    others = [threading.Thread(target=go, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    while len(writer._queue) < 2:
        time.sleep(0.001)
    rec.release.set()
    for t in [first, *others]:
        t.join(5)
        assert not t.is_alive()
    assert results[1] is boom and results[2] is boom
    assert not writer._leading


@pytest.mark.django_db
def test_inside_the_callers_transaction_nothing_is_shared():
    rec = Recorder(hold_first=False)
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    with transaction.atomic():
        assert writer.submit({"n": 1}) == {"echo": 1, "how": "alone"}
    assert rec.batches == []


# --- requests waiting on the event loop -----------------------------------------------


def _async_burst(writer: GroupCommit, recorder: Recorder, ns: list[int], cancel: set[int] = frozenset()) -> dict:
    """The first request's write is held until every other request waits."""
    import asyncio

    async def main():
        first = asyncio.ensure_future(writer.submit_async({"n": ns[0]}, order=(ns[0],)))
        assert await asyncio.get_running_loop().run_in_executor(None, recorder.started.wait, 5)
        rest = {n: asyncio.ensure_future(writer.submit_async({"n": n}, order=(-n,))) for n in ns[1:]}
        await asyncio.sleep(0.05)
        for n in cancel:
            rest[n].cancel()
        recorder.release.set()
        out = {}
        for n, fut in [(ns[0], first), *rest.items()]:
            try:
                out[n] = await fut
            except BaseException as exc:  # noqa: BLE001 - the test looks at what each request got
                out[n] = exc
        return out

    return asyncio.run(main())


@pytest.fixture
def own_db_threads(settings):
    """A database thread pool of two for this test; its connections are
    closed afterwards and the gateway's pool is put back."""
    import asyncio

    from conversations.gateway import dbsection

    settings.GATEWAY = {**settings.GATEWAY, "DB_THREADS": 2}
    saved, dbsection._executor = dbsection._executor, None
    yield
    if dbsection._executor is not None:
        asyncio.run(dbsection.close_connections())
        dbsection._executor.shutdown(wait=True)
    dbsection._executor = saved


@pytest.mark.django_db(transaction=True)
def test_requests_on_the_event_loop_share_the_next_transaction_without_holding_threads(own_db_threads):
    """Thirty requests wait while one is written, with only two database
    threads: they wait as futures, and all go in the next transaction
    (given a batch cap above thirty)."""
    rec = Recorder()
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch, max_batch=64)
    out = _async_burst(writer, rec, list(range(1, 32)))
    assert out[1] == {"echo": 1, "how": "alone"}
    assert all(out[n] == {"echo": n, "how": "batched"} for n in range(2, 32))
    assert rec.batches == [sorted(range(2, 32), key=lambda n: -n)]  # one transaction, in the callers' order
    assert not writer._draining and not writer._waiting


@pytest.mark.django_db(transaction=True)
def test_on_the_event_loop_a_rejected_batch_fails_only_the_bad_request_and_a_cancelled_one_is_still_written(own_db_threads):
    rec = Recorder(batch_error=_server_error("23503"), bad={3})
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)
    out = _async_burst(writer, rec, [1, 2, 3, 4], cancel={4})
    assert out[2] == {"echo": 2, "how": "alone"}
    assert isinstance(out[3], DatabaseError)
    assert type(out[4]).__name__ == "CancelledError"
    assert sorted(rec.singles) == [1, 2, 3, 4]  # the request that went away was written all the same


@pytest.mark.django_db(transaction=True)
def test_write_if_idle_writes_at_once_only_when_nothing_is_being_written(own_db_threads):
    import asyncio

    rec = Recorder()
    writer = GroupCommit(name="test", single=rec.single, batch=rec.batch)

    async def main():
        first = asyncio.ensure_future(writer.submit_async({"n": 1}))
        assert await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 5)
        busy = writer.write_if_idle({"n": 2})  # someone is being written: wait like everyone else
        rec.release.set()
        await first
        for _ in range(500):  # the writer job notices the empty queue just after answering
            if not writer._draining:
                break
            await asyncio.sleep(0.001)
        return busy, writer.write_if_idle({"n": 3})

    busy, idle = asyncio.run(main())
    assert busy is None and idle == {"echo": 3, "how": "alone"}
    assert rec.singles == [1, 3]


# --- the real functions on Postgres ------------------------------------------------

needs_postgres = pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL functions exist on Postgres only")


def _payload(key, price, n: int, price_id=None):
    payload, external_id = recording_sql.open_payload(
        budgets=[], hold_usd=Decimal(0), hold_tokens=0, ttl_s=60, request_id=f"gc-{n}", api_key=key,
        conversation_external_id=f"gc-conv-{n % 2}", end_user="", step="", stream=False,
        model_requested="gpt-4o-mini", model_used="gpt-4o-mini", parameters={}, price=SimpleNamespace(pk=price_id or price.pk),
        messages=[{"role": "user", "content": f"question {n}"}], estimated_prompt_tokens=3, token_count_is_estimate=False,
        provider_base_url="http://127.0.0.1:1/v1",
    )
    return _Item(payload, (key.application_id, external_id))


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_batch_is_all_or_nothing_and_the_fallback_isolates_the_bad_request():
    _, price = make_model()
    key = create_api_key(application=make_application(slug="gc")).api_key
    good = [_payload(key, price, n) for n in (1, 2, 4)]
    bad = _payload(key, price, 3, price_id=987654321)  # no such price: the foreign key fails at commit

    with pytest.raises(DatabaseError) as info:
        recording_sql.OPENS._batch([it.payload for it in [*good, bad]])
    assert info.value.__cause__.sqlstate == "23503"
    assert not ProviderCall.objects.exists() and not Message.objects.exists() and not Conversation.objects.exists()

    items = [*good, bad]
    recording_sql.OPENS._write(items, leader=None)
    assert isinstance(bad.error, DatabaseError) and bad.result is None
    assert all(it.error is None and it.result["call_id"] for it in good)
    assert sorted(ProviderCall.objects.values_list("request_id", flat=True)) == ["gc-1", "gc-2", "gc-4"]
    assert Message.objects.count() == 3
    assert Conversation.objects.count() == 2


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_batch_writes_what_the_calls_one_by_one_would():
    _, price = make_model()
    key = create_api_key(application=make_application(slug="gc2")).api_key
    items = [_payload(key, price, n) for n in range(6)]
    results = recording_sql.OPENS._batch([it.payload for it in items])
    calls = {c.pk: c for c in ProviderCall.objects.all()}
    assert [calls[r["call_id"]].request_id for r in results] == [f"gc-{n}" for n in range(6)]
    convs = {c.external_id: c.pk for c in Conversation.objects.all()}
    assert [r["conversation_id"] for r in results] == [convs[f"gc-conv-{n % 2}"] for n in range(6)]
