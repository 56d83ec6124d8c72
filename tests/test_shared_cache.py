"""The counters the workers share (breakers, rate limits): what one round trip
writes must read back through the ordinary cache API, and the gateway must not
open a Redis connection per request."""

import httpx
import pytest
from django.conf import settings
from django.core.cache import caches

from conversations.gateway import breaker, shared

needs_redis = pytest.mark.skipif("redis" not in settings.CACHES["default"]["BACKEND"].lower(), reason="needs REDIS_URL")


def test_incr_then_get_counts_and_reads_in_one_go():
    caches["default"].clear()
    shared.set("probe:open", 1234.5, None)
    assert shared.incr_then_get("probe:n", 1, 40, "probe:open") == (1, 1234.5)
    assert shared.incr_then_get("probe:n", 2, 40, "probe:missing") == (3, None)
    # the breaker reads the counters back with get_many
    assert shared.get_many(["probe:n"]) == {"probe:n": 3}


@needs_redis
def test_counters_expire_from_their_first_use():
    caches["default"].clear()
    shared.incr_then_get("probe:ttl", 1, 40, "probe:other")
    client = caches["default"]._cache.get_client()
    key = caches["default"].make_and_validate_key("probe:ttl")
    first = client.ttl(key)
    assert 0 < first <= 40
    shared.incr_then_get("probe:ttl", 1, 99, "probe:other")  # a later use does not extend it
    assert client.ttl(key) <= first


def test_breaker_still_opens_on_failures_and_closes_on_a_probe():
    caches["default"].clear()
    key = breaker.key_for("http://127.0.0.1:9/v1", "probe-model")
    now = 1_000_000.0
    for _ in range(settings.GATEWAY["BREAKER"]["MIN_CALLS"]):
        breaker.record(key, False, now=now)
    assert not breaker.allow(key, now=now + 1)
    later = now + settings.GATEWAY["BREAKER"]["OPEN_S"] + 1
    assert breaker.allow(key, now=later)  # half-open: this caller probes
    breaker.record(key, True, now=later)
    assert breaker.allow(key, now=later + 1)
    assert shared.get(f"cb:{key}:open") is None


@needs_redis
def test_gateway_reuses_its_redis_connections(gateway, app_key):
    client = caches["default"]._cache.get_client()
    before = client.info("stats")["total_connections_received"]
    for i in range(30):
        resp = httpx.post(
            f"{gateway}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {app_key[2]}", "X-Request-ID": f"req-redis-{i}"},
            timeout=30,
        )
        assert resp.status_code == 200
    opened = client.info("stats")["total_connections_received"] - before
    assert opened < 10, f"{opened} new Redis connections for 30 requests"


def test_a_breaker_opened_by_another_worker_is_seen_without_extra_reads(monkeypatch):
    """allow() reuses the open marker this process read with its last recorded
    call; another worker's verdict arrives with the next call, or after
    SEEN_FRESH_S when this worker records none."""
    caches["default"].clear()
    breaker.forget()
    key = breaker.key_for("http://127.0.0.1:9/v1", "other-worker")
    breaker.record(key, True)
    assert breaker.allow(key)
    shared.set(f"cb:{key}:open", 2e12, None)  # another worker opened it
    breaker.record(key, True)  # this worker's next call brings the marker back
    assert not breaker.allow(key)

    monkeypatch.setattr(breaker, "SEEN_FRESH_S", 0.05)
    healed = breaker.key_for("http://127.0.0.1:9/v1", "healed-elsewhere")
    assert breaker.allow(healed)
    shared.set(f"cb:{healed}:open", 2e12, None)
    import time

    time.sleep(0.06)
    assert not breaker.allow(healed)  # no recorded call in between: re-read once stale


@needs_redis
def test_a_configuration_change_elsewhere_is_pushed_to_the_gateway(gateway, app_key):
    """Another process (say an admin's) revokes a key: the gateway hears of it
    on the Redis channel and refuses the key's next request, without reading
    the generation on every request."""
    import time

    from django.utils import timezone

    from conversations.gateway import config_cache
    from governance.models import ApiKey

    app, key, secret = app_key
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200
    deadline = time.monotonic() + 5
    while not config_cache._listener.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert config_cache._listener.live
    assert httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200  # key cached

    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())  # no signal in this process
    caches["default"]._cache.get_client().publish(config_cache.CHANNEL, "from-another-process")  # what its changed() sends
    deadline = time.monotonic() + 2
    while config_cache._generation != "from-another-process" and time.monotonic() < deadline:
        time.sleep(0.005)
    resp = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "revoked_api_key"


def test_successes_reach_the_shared_count_within_the_flush_interval():
    """Counting a success costs no Redis round trip on the request; the other
    workers see it within breaker.FLUSH_S, and a failure brings the pending
    ones with it so its ratio is judged on every call made."""
    import time

    caches["default"].clear()
    breaker.forget()
    key = breaker.key_for("http://127.0.0.1:9/v1", "batched")
    for _ in range(5):
        breaker.count_success(key)
    # read over the whole window: the flush may land in the next 10 s bucket
    deadline = time.monotonic() + 2
    while breaker._window(key, time.time())[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert breaker._window(key, time.time()) == (5, 0)

    with breaker._pending_lock:  # successes not yet flushed ...
        breaker._pending[key] = breaker._pending.get(key, 0) + 3
    breaker.record(key, False)  # ... go with the failure
    assert breaker._window(key, time.time()) == (9, 1)
    assert breaker.allow(key)  # 1 failure in 9 calls: still closed


def test_rate_limit_counters_read_the_same_from_either_path():
    """The event loop's path (asyncio Redis) and a thread's (the cache
    client) count into the same counters, readable through the cache API."""
    import asyncio

    caches["default"].clear()
    assert shared.incr_many([("probe:rl:r", 1), ("probe:rl:t", 250)], 70) == [1, 250]
    assert asyncio.run(shared.incr_many_async([("probe:rl:r", 1), ("probe:rl:t", 40)], 70)) == [2, 290]
    assert shared.incr_many([("probe:rl:r", 1)], 70) == [3]
    assert shared.get_many(["probe:rl:r", "probe:rl:t"]) == {"probe:rl:r": 3, "probe:rl:t": 290}


@needs_redis
def test_rate_limit_counters_expire_from_their_first_use_on_the_loop():
    import asyncio

    caches["default"].clear()
    asyncio.run(shared.incr_many_async([("probe:rl:ttl", 1)], 40))
    client = caches["default"]._cache.get_client()
    key = caches["default"].make_and_validate_key("probe:rl:ttl")
    first = client.ttl(key)
    assert 0 < first <= 40
    asyncio.run(shared.incr_many_async([("probe:rl:ttl", 1)], 99))  # a later use does not extend it
    assert client.ttl(key) <= first


@needs_redis
def test_redis_down_on_the_loop_counts_in_memory_and_says_so(settings, caplog):
    """A dead Redis costs the request one short timeout, then the counters
    live in this process's memory and /readyz's status says why."""
    import asyncio

    dead = {**settings.CACHES["default"], "LOCATION": "redis://127.0.0.1:1/0"}
    settings.CACHES = {**settings.CACHES, "default": dead}
    try:
        assert asyncio.run(shared.incr_many_async([("probe:rl:down", 1)], 70)) == [1]
        assert shared.status() and "per-process fallback" in shared.status()
        # while Redis is marked down nobody waits for it again
        assert asyncio.run(shared.incr_many_async([("probe:rl:down", 2)], 70)) == [3]
    finally:
        shared._down_until, shared._down_since = 0.0, None
        shared._local.clear()


@needs_redis
def test_concurrent_requests_share_pipelines_and_each_gets_its_own_count():
    """Requests counting at the same time go out together, and each still
    reads the count its own increment made: 1 to 30, each once."""
    import asyncio

    caches["default"].clear()
    client = caches["default"]._cache.get_client()
    before = client.info("commandstats").get("cmdstat_incrby", {}).get("calls", 0)

    async def burst():
        return await asyncio.gather(*(shared.incr_many_async([("probe:rl:burst", 1), ("probe:rl:burst-t", 10)], 70) for _ in range(30)))

    counts = asyncio.run(burst())
    assert sorted(c[0] for c in counts) == list(range(1, 31))
    assert all(t == 10 * r for r, t in counts), "a request's counters come from the same increments"
    assert client.info("commandstats")["cmdstat_incrby"]["calls"] - before == 60
    assert shared.get("probe:rl:burst") == 30


@needs_redis
def test_a_closed_loops_redis_client_is_let_go():
    """Each event loop gets its own batching Redis client; once a loop has
    closed, the next loop to count drops the old client instead of keeping
    it (and its loop) for the life of the process."""
    import asyncio

    caches["default"].clear()
    first = asyncio.new_event_loop()
    first.run_until_complete(shared.incr_many_async([("probe:rl:loops", 1)], 70))
    assert first in shared._batchers
    first.close()
    assert asyncio.run(shared.incr_many_async([("probe:rl:loops", 1)], 70)) == [2]
    assert first not in shared._batchers
