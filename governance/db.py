"""Raw statements on Django's own connection, for the gateway's few hottest
queries on Postgres.

Why: Django's psycopg cursor binds parameters client-side and never prepares,
so a statement run on every request is parsed and planned every time, and its
parameters are quoted in Python. Here the text is constant, the parameters go
separately (server-side binding) and the statement is prepared once per
connection. Errors are wrapped as Django's (django.db.Error), so callers
handle a database outage the same way as on the ORM path; the transaction is
Django's (autocommit, or the caller's atomic block).

Django opens psycopg connections with prepared statements disabled
(prepare_threshold=None, for transaction-pooling proxies such as PgBouncer);
these statements re-enable them per connection, for themselves only, unless
GATEWAY_PREPARED_STATEMENTS is off.
"""

import psycopg
from django.conf import settings
from django.db import connection

_ONLY_WHEN_ASKED = 2**31 - 1  # automatic preparation never triggers; prepare=True does


def fetch_prepared(sql: str, params: tuple | list) -> list[tuple]:
    connection.ensure_connection()
    raw = connection.connection
    prepare = settings.GATEWAY["PREPARED_STATEMENTS"]
    if prepare and raw.prepare_threshold is None:
        raw.prepare_threshold = _ONLY_WHEN_ASKED
    with connection.wrap_database_errors:
        with psycopg.Cursor(raw) as cursor:
            cursor.execute(sql, params, prepare=prepare)
            return cursor.fetchall()
