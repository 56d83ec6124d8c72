"""Raw statements on Django's own connection, for the gateway's few hottest
queries on Postgres.

Why: Django's psycopg cursor binds parameters client-side and never prepares,
so a statement run on every request is parsed and planned every time, and its
parameters are quoted in Python. Here the text is constant, the parameters go
separately (server-side binding) and the statement is prepared once per
connection. Errors are wrapped as Django's (django.db.Error), so callers
handle a database outage the same way as on the ORM path; the transaction is
Django's (autocommit, or the caller's atomic block).
"""

import psycopg
from django.db import connection


def fetch_prepared(sql: str, params: tuple | list) -> list[tuple]:
    connection.ensure_connection()
    with connection.wrap_database_errors:
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(sql, params, prepare=True)
            return cursor.fetchall()
