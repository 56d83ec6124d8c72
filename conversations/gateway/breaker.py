"""A circuit breaker per provider and model, shared by all workers.

Closed: calls go through; failures and calls are counted in 10-second buckets.
It opens when, over the last 30 seconds, at least `MIN_CALLS` calls were made
and the failure ratio reached `FAILURE_RATIO`. Open: calls are refused at once
for `OPEN_S`. Then half-open: exactly one worker wins the probe (an atomic
`add`); its success closes the breaker, its failure opens it again.
"""

import threading
import time
from dataclasses import dataclass

from django.conf import settings

from conversations.gateway import shared

BUCKET_S = 10
WINDOW_BUCKETS = 3
REGISTRY = "cb:registry"


def _cfg(name: str):
    return settings.GATEWAY["BREAKER"][name]


def key_for(base_url: str, model: str) -> str:
    return f"{base_url}|{model}"


def _buckets(now: float) -> list[int]:
    b = int(now // BUCKET_S)
    return [b - i for i in range(WINDOW_BUCKETS)]


def _register(key: str) -> None:
    known = shared.get(REGISTRY) or []
    if key not in known:
        shared.set(REGISTRY, [*known, key][-500:], None)


# What this process last read of each breaker's open marker, and when. Every
# recorded call reads the marker anyway (in the same round trip as its count),
# so under traffic allow() needs no read of its own: a breaker opened by
# another worker is seen after this worker's next recorded call, or within
# SEEN_FRESH_S when it makes none.
SEEN_FRESH_S = 1.0
_seen: dict[str, tuple[float, float | None]] = {}


def _open_marker(key: str) -> float | None:
    seen = _seen.get(key)
    if seen is not None and time.monotonic() - seen[0] < SEEN_FRESH_S:
        return seen[1]
    open_until = shared.get(f"cb:{key}:open")
    _seen[key] = (time.monotonic(), open_until)
    return open_until


def forget() -> None:
    """Drop what this process remembers (tests reset the shared state)."""
    _seen.clear()
    with _pending_lock:
        _pending.clear()


def allow(key: str, *, now: float | None = None) -> bool:
    now = now or time.time()
    open_until = _open_marker(key)
    if open_until is None:
        return True
    if now < open_until:
        return False
    # half-open: one probe at a time, the probe slot expires with the read timeout
    return shared.add(f"cb:{key}:probe", now, ttl=_cfg("PROBE_TIMEOUT_S"))


def record(key: str, ok: bool, *, now: float | None = None, successes: int = 1, probe: bool = True) -> None:
    """Count a call now (a failure, or `successes` successful calls). A
    failure also takes this process's successes not yet shared, so the
    failure ratio it is judged by includes them. Successes flushed in bulk
    are not a probe: they never close a half-open breaker."""
    now = now or time.time()
    bucket = _buckets(now)[0]
    ttl = BUCKET_S * (WINDOW_BUCKETS + 1)
    calls = successes if ok else 1 + _take_pending(key)
    if not ok:
        shared.incr(f"cb:{key}:{bucket}:f", 1, ttl=ttl)
    _, open_until = shared.incr_then_get(f"cb:{key}:{bucket}:n", calls, ttl, f"cb:{key}:open")
    _seen[key] = (time.monotonic(), open_until)
    half_open = open_until is not None and now >= open_until
    if ok:
        if half_open and probe:
            _close(key, now)
        return
    if half_open:
        _open(key, now)
        return
    calls, failures = _window(key, now)
    if calls >= _cfg("MIN_CALLS") and failures / calls >= _cfg("FAILURE_RATIO") and open_until is None:
        _open(key, now)


# Successes while a breaker is closed are counted in this process and added
# to the shared count every FLUSH_S by a daemon thread: one Redis round trip
# per process and interval instead of one per call (a success changes no
# decision, and a failure takes the pending ones with it). A success while the
# breaker is open or half-open here (a probe) is recorded at once.
FLUSH_S = 0.1
_pending: dict[str, int] = {}
_pending_lock = threading.Lock()
_flusher: threading.Thread | None = None


def count_success(key: str) -> None:
    seen = _seen.get(key)
    if seen is not None and seen[1] is not None:
        record(key, True)
        return
    with _pending_lock:
        _pending[key] = _pending.get(key, 0) + 1
    _ensure_flusher()


def _take_pending(key: str) -> int:
    with _pending_lock:
        return _pending.pop(key, 0)


def flush() -> None:
    with _pending_lock:
        pending = dict(_pending)
        _pending.clear()
    for key, n in pending.items():
        record(key, True, successes=n, probe=False)


def _ensure_flusher() -> None:
    global _flusher
    if _flusher is not None:
        return
    with _pending_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_forever, name="breaker-flush", daemon=True)
            _flusher.start()


def _flush_forever() -> None:
    import structlog

    log = structlog.get_logger("gateway.breaker")
    while True:
        time.sleep(FLUSH_S)
        try:
            flush()
        except Exception as exc:  # noqa: BLE001 - the thread must outlive a bad flush; the counts are advisory
            log.warning("breaker.flush_failed", error=repr(exc))


def _window(key: str, now: float) -> tuple[int, int]:
    names = [f"cb:{key}:{b}:{kind}" for b in _buckets(now) for kind in ("n", "f")]
    values = shared.get_many(names)
    calls = sum(v for k, v in values.items() if k.endswith(":n"))
    failures = sum(v for k, v in values.items() if k.endswith(":f"))
    return calls, failures


def _open(key: str, now: float) -> None:
    shared.set(f"cb:{key}:open", now + _cfg("OPEN_S"), None)
    _seen[key] = (time.monotonic(), now + _cfg("OPEN_S"))
    shared.delete_many([f"cb:{key}:probe"])
    _register(key)


def _close(key: str, now: float) -> None:
    names = [f"cb:{key}:open", f"cb:{key}:probe"] + [f"cb:{key}:{b}:{k}" for b in _buckets(now) for k in ("n", "f")]
    shared.delete_many(names)
    _seen[key] = (time.monotonic(), None)


@dataclass(frozen=True)
class BreakerState:
    key: str
    state: str  # closed | open | half-open
    calls: int
    failures: int
    open_until: float | None


def states(*, now: float | None = None) -> list[BreakerState]:
    """Every breaker that has opened at least once, for the admin screen."""
    now = now or time.time()
    out = []
    for key in shared.get(REGISTRY) or []:
        open_until = shared.get(f"cb:{key}:open")
        calls, failures = _window(key, now)
        state = "closed" if open_until is None else ("open" if now < open_until else "half-open")
        out.append(BreakerState(key, state, calls, failures, open_until))
    return out
