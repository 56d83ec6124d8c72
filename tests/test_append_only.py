"""Prompts and answers are append-only. Through the ORM on every database;
on Postgres the database itself refuses UPDATE and DELETE."""

import datetime as dt

import pytest
from django.db import DatabaseError, connection, transaction

from conversations.models import AppendOnlyError, Conversation, Message, ProviderCall
from governance.models import Application

UTC = dt.timezone.utc


@pytest.fixture
def recorded(db):
    app = Application.objects.create(slug="a", name="A", default_model="m")
    now = dt.datetime.now(UTC)
    conv = Conversation.objects.create(application=app, external_id="c", started_at=now, last_activity_at=now)
    call = ProviderCall.objects.create(request_id="r1", application=app, conversation=conv, status="succeeded", outcome="answered", created_at=now)
    open_call = ProviderCall.objects.create(request_id="r2", application=app, conversation=conv, status="in_progress", created_at=now)
    msg = Message.objects.create(conversation=conv, call=call, direction="request", position=0, role="user", content="secret prompt", content_sha256="x", created_at=now)
    return conv, call, open_call, msg


def test_orm_refuses_edits(recorded):
    _, call, _, msg = recorded
    msg.content = "rewritten"
    with pytest.raises(AppendOnlyError):
        msg.save()
    with pytest.raises(AppendOnlyError):
        msg.delete()
    with pytest.raises(AppendOnlyError):
        Message.objects.filter(pk=msg.pk).update(content="x")
    with pytest.raises(AppendOnlyError):
        Message.objects.all().delete()
    with pytest.raises(AppendOnlyError):
        ProviderCall.objects.filter(pk=call.pk).delete()


pg_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="database-level triggers are a Postgres feature")


@pg_only
@pytest.mark.postgres
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE conversations_message SET content = 'rewritten'",
        "DELETE FROM conversations_message",
        "UPDATE conversations_providercall SET cost_usd = 0 WHERE request_id = 'r1'",
        "DELETE FROM conversations_providercall WHERE request_id = 'r2'",
    ],
)
def test_postgres_refuses_raw_sql(recorded, sql):
    with pytest.raises(DatabaseError, match="Cannot"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert Message.objects.get().content == "secret prompt"


@pg_only
@pytest.mark.postgres
def test_postgres_allows_finishing_an_in_progress_call_once(recorded):
    _, _, open_call, _ = recorded
    with connection.cursor() as cursor:
        cursor.execute("UPDATE conversations_providercall SET status = 'succeeded' WHERE request_id = 'r2'")
    with pytest.raises(DatabaseError):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE conversations_providercall SET status = 'failed' WHERE request_id = 'r2'")
    open_call.refresh_from_db()
    assert open_call.status == "succeeded"
