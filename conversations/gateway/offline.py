"""Admission on the event loop, for requests it can decide from memory.

Why: admission ran on a database thread for every request, in case it had to
read configuration, touch the key, read the budgets or record a refusal. Under
load nearly every request needs none of that (configuration and budget
readings are cached in the process), and the hop to a thread and back, with
eight threads and the event loop taking turns at the GIL, was a share of the
gateway's CPU and queueing in every burst. So admission first runs on the
loop with I/O forbidden: each place that would read or write the database or
Redis, or spend long on the CPU, calls `needs_io()` first, which raises while
forbidden. The caller then runs admission again from the start on a database
thread; nothing was written before the raise, so nothing is done twice.
"""

import contextlib
import threading


class NeedsIO(Exception):
    """Admission needs the database, Redis or a long computation."""


_state = threading.local()


@contextlib.contextmanager
def io_forbidden():
    """Within this block (synchronous code, on one thread), needs_io() raises."""
    _state.forbidden = True
    try:
        yield
    finally:
        _state.forbidden = False


def is_forbidden() -> bool:
    return getattr(_state, "forbidden", False)


def needs_io(what: str) -> None:
    if getattr(_state, "forbidden", False):
        raise NeedsIO(what)


# Counting more text than this is left to a database thread: the event loop
# serves every other request meanwhile (tiktoken counts a few MB/s).
MAX_TEXT_ON_LOOP = 16_000
