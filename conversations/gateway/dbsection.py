"""Run a synchronous ORM section from the async gateway.

Sections run on a small dedicated thread pool rather than asgiref's
per-request thread, and hand their connection back (to Django's psycopg pool
on Postgres) when done, so a handful of connections serve any number of
in-flight requests.
"""

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import connection

_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(
            max_workers=settings.GATEWAY["DB_THREADS"], thread_name_prefix="gateway-db"
        )
    return _executor


def _run(fn, kwargs):
    try:
        return fn(**kwargs)
    finally:
        connection.close()


async def db_section(fn, /, **kwargs):
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()  # keeps the request id on log lines written in the section
    return await loop.run_in_executor(_pool(), functools.partial(ctx.run, _run, fn, kwargs))
