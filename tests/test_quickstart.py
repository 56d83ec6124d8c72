"""The README's first command: quickstart sets the platform up (and on
Postgres creates its database), prints what a first user needs, and is safe
to run again."""

import io
import re

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connection

from conversations.models import Conversation, ProviderCall
from governance.dbsetup import DatabaseUnreachable, Target, ensure_postgres_database
from governance.models import ApiKey, Application
from governance.selectors import key_for_secret
from tests.conftest import free_port, raw_connection


def _quickstart(**options) -> str:
    out = io.StringIO()
    call_command("quickstart", stdout=out, **options)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_quickstart_prints_working_logins_and_key_and_runs_again_safely():
    Group.objects.all().delete()  # a database whose role groups went missing gets them back
    text = _quickstart(port=8123)
    assert "http://127.0.0.1:8123/admin/" in text and "http://127.0.0.1:8123/v1" in text
    password = re.search(r"password: (\S+)", text).group(1)
    secret = re.search(r"API key:\s+(\S+)", text).group(1)
    assert authenticate(username="admin", password=password).is_superuser
    assert authenticate(username="manager", password=password).groups.filter(name="Manager").exists()
    assert authenticate(username="reviewer", password=password).has_perm("conversations.view_conversation")
    assert key_for_secret(secret=secret).application.slug == "support-bot"
    assert Conversation.objects.exists() and ProviderCall.objects.exists(), "demo conversations to look at"
    calls = ProviderCall.objects.count()

    again = _quickstart(port=8123)
    assert Application.objects.filter(slug="support-bot").count() == 1
    assert ProviderCall.objects.count() == calls, "demo data is seeded once"
    new_password = re.search(r"password: (\S+)", again).group(1)
    assert authenticate(username="auditor", password=new_password) is not None
    assert ApiKey.objects.filter(application__slug="support-bot").count() == 2, "a fresh key each run"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="creates a Postgres database")
@pytest.mark.django_db
def test_a_missing_postgres_database_is_created_once():
    target = Target.from_settings({**connection.settings_dict, "NAME": "governance_quickstart_probe"})
    with raw_connection("postgres", autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS governance_quickstart_probe")
    try:
        assert ensure_postgres_database(target) is True
        assert ensure_postgres_database(target) is False
        with raw_connection("governance_quickstart_probe") as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "governance_quickstart_probe"
    finally:
        with raw_connection("postgres", autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS governance_quickstart_probe")


def test_an_unreachable_postgres_is_said_plainly():
    target = Target.from_url(f"postgres://postgres@127.0.0.1:{free_port()}/governance")
    with pytest.raises(DatabaseUnreachable) as info:
        ensure_postgres_database(target)
    message = str(info.value)
    assert f"127.0.0.1:{target.port}" in message and "cannot be reached" in message
    assert "unset DATABASE_URL" in message
