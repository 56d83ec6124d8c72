"""Run a synchronous ORM section from the async gateway.

Sections run on a small dedicated thread pool rather than asgiref's
per-request thread; each thread keeps its connection (from Django's psycopg
pool on Postgres) between sections, so a handful of connections serve any
number of in-flight requests and a broken one is replaced on the next section.
"""

import asyncio
import contextvars
import functools
import threading
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
        # Keep a healthy connection for this thread's next section (handing it
        # back to the pool and taking it again costs more than the section's
        # own queries); drop one that failed, so the next section reconnects.
        if connection.errors_occurred or connection.in_atomic_block:
            connection.close()


async def db_section(fn, /, **kwargs):
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()  # keeps the request id on log lines written in the section
    return await loop.run_in_executor(_pool(), functools.partial(ctx.run, _run, fn, kwargs))


def start_in_pool(fn) -> None:
    """Run fn on a database thread without waiting for it (group commit's
    writer job); its connection is looked after as a section's is."""
    _pool().submit(_run, fn, {})


def _close_own_connection(barrier: threading.Barrier) -> None:
    try:
        barrier.wait(timeout=5)  # one of these per thread: nobody runs two
    except threading.BrokenBarrierError:
        pass
    connection.close()


def _close_pool() -> None:
    if getattr(connection, "pool", None) is not None:
        connection.close_pool()


async def close_connections() -> None:
    """At shutdown: each database thread hands back the connection it kept,
    then the pool is closed, so the server leaves no session behind (Postgres
    counts them; tests cannot drop their database while one is open)."""
    if _executor is None:
        return
    threads = settings.GATEWAY["DB_THREADS"]
    barrier = threading.Barrier(threads)
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(_executor, _close_own_connection, barrier) for _ in range(threads)))
    await loop.run_in_executor(_executor, _close_pool)
