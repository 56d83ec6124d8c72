"""Counters shared by every gateway worker: Django's cache, which is Redis in
production. If Redis stops answering, the gateway keeps serving: each process
falls back to its own memory for a while, logs it once, and /readyz says so.

Redis calls are short (socket timeouts of a quarter second, set in settings)
and after a failure Redis is not tried again for a few seconds, so a dead
Redis costs at most one timeout per process per few seconds."""

import threading
import time

import structlog
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

log = structlog.get_logger("gateway.shared")

RETRY_AFTER_S = 5.0
_local = LocMemCache("gateway-local-fallback", {"MAX_ENTRIES": 100_000})
_lock = threading.Lock()
_down_until = 0.0
_down_since: float | None = None


def _shared_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    return tuple(errors)


_ERRORS = _shared_errors()


def status() -> str | None:
    """None when shared state works; otherwise why features are degraded."""
    if _down_since is None:
        return None
    return f"shared cache unreachable since {time.strftime('%H:%M:%S', time.gmtime(_down_since))} UTC; per-process fallback"


_shared_cache = None


def _backend():
    """One cache client per process. Django's caches["default"] is per thread
    and per asyncio task, so on the gateway (a task per request) it opened a
    new Redis connection for every request: most of the gateway's CPU."""
    global _shared_cache
    if time.monotonic() < _down_until:
        return _local
    if _shared_cache is None:
        _shared_cache = caches.create_connection("default")
    return _shared_cache


@receiver(setting_changed)
def _cache_settings_changed(*, setting: str, **kwargs) -> None:
    global _shared_cache
    if setting == "CACHES":
        _shared_cache = None


def _failed(exc: BaseException) -> None:
    global _down_until, _down_since
    with _lock:
        _down_until = time.monotonic() + RETRY_AFTER_S
        if _down_since is None:
            _down_since = time.time()
            log.warning("shared_cache.down", error=type(exc).__name__, fallback="per-process memory")


def _ok(backend) -> None:
    global _down_since
    if backend is not _local and _down_since is not None:
        with _lock:
            if _down_since is not None:
                log.warning("shared_cache.back", down_for_s=round(time.time() - _down_since, 1))
                _down_since = None


def _call(op: str, *args, **kwargs):
    backend = _backend()
    try:
        result = getattr(backend, op)(*args, **kwargs)
    except _ERRORS as exc:
        if backend is _local:
            raise
        _failed(exc)
        return getattr(_local, op)(*args, **kwargs)
    _ok(backend)
    return result


def _pipeline(backend):
    """A Redis pipeline for a single-server Redis cache (several commands, one
    round trip), else None. Uses Django's key scheme and value encoding, so
    what it writes reads back through the cache API and the other way round."""
    if not isinstance(backend, RedisCache) or len(backend._cache._servers) != 1:
        return None
    return backend._cache.get_client(write=True).pipeline(transaction=False)


def redis_url() -> str | None:
    """The shared cache's Redis URL, when the shared cache is one Redis server."""
    from django.conf import settings

    cache = settings.CACHES["default"]
    if "redis" not in cache["BACKEND"].lower():
        return None
    location = cache["LOCATION"]
    if isinstance(location, str) and "," not in location:
        return location
    return None


def publish(channel: str, message: str) -> None:
    """Best effort: listeners that miss it catch up from the shared cache."""
    backend = _backend()
    if not isinstance(backend, RedisCache):
        return
    try:
        backend._cache.get_client(write=True).publish(channel, message)
    except _ERRORS as exc:
        _failed(exc)


def incr_then_get(counter: str, delta: int, ttl: int, read: str) -> tuple[int, object]:
    """Add to a counter living `ttl` seconds from its first use, and read
    another key: one round trip on Redis (this runs for every provider call)."""
    backend = _backend()
    pipe = _pipeline(backend)
    if pipe is not None:
        try:
            key = backend.make_and_validate_key(counter)
            pipe.incrby(key, delta)
            pipe.expire(key, int(ttl), nx=True)
            pipe.get(backend.make_and_validate_key(read))
            count, _, raw = pipe.execute()
        except _ERRORS as exc:
            _failed(exc)
        else:
            _ok(backend)
            return int(count), (None if raw is None else backend._cache._serializer.loads(raw))
    return incr(counter, delta, ttl), get(read)


def incr(key: str, delta: int, ttl: int) -> int:
    """Atomic add to a counter that lives `ttl` seconds from its first use."""
    _call("add", key, 0, ttl)
    try:
        return _call("incr", key, delta)
    except ValueError:  # expired between add and incr
        _call("add", key, 0, ttl)
        return _call("incr", key, delta)


def add(key: str, value, ttl: float) -> bool:
    return _call("add", key, value, ttl)


def get(key: str, default=None):
    return _call("get", key, default)


def get_many(keys: list[str]) -> dict:
    return _call("get_many", keys)


def set(key: str, value, ttl: float | None) -> None:  # noqa: A001 - mirrors the cache API
    _call("set", key, value, ttl)


def delete_many(keys: list[str]) -> None:
    _call("delete_many", keys)
