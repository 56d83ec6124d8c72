"""Configuration the gateway reads on every request — the key and its
application, the model and its prices, budgets, step policies, the ladder and
fallbacks — cached in each process.

Entries live at most TTL_S seconds, and all are dropped as soon as the shared
configuration generation changes: every save or delete of a governing model
sets a new generation (governance/config_events.py) and publishes it on a
Redis channel. Each gateway process listens on that channel, so a revoked key
or a new price reaches every worker within a millisecond or so, without a
Redis read per request. While the listener is not connected (starting, or
Redis away) admission reads the generation from the shared cache on every
request instead, which catches up on anything missed. Without Redis, other
processes see a change within TTL_S. Spend and holds are never cached.
"""

import threading
import time
import uuid
from datetime import datetime

from budgets.models import Budget, DegradationRule, LanguageModel, ModelPrice, StepPolicy
from budgets.selectors import ModelNotPriced, PricedModel, UnknownModel
from conversations.gateway import offline, shared
from governance.models import ApiKey, Application, FallbackRoute
from governance.selectors import key_for_secret
from governance.services import hash_key

TTL_S = 5.0
GENERATION_KEY = "config:generation"

_lock = threading.Lock()
_entries: dict[tuple, tuple[float, object]] = {}
_generation: str | None = None
_touched: dict[int, float] = {}


CHANNEL = "gateway:config-generation"


class _Listener:
    """Redis pub/sub subscriber on a daemon thread; `live` while subscribed."""

    def __init__(self):
        self.live = False
        self.thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        if self.thread is not None or shared.redis_url() is None:
            return
        with self._start_lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="config-listener", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        import redis

        while True:
            try:
                client = redis.Redis.from_url(
                    shared.redis_url(), socket_connect_timeout=0.5, socket_keepalive=True, health_check_interval=5
                )
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                _adopt(_shared_generation())  # whatever changed before we were listening
                self.live = True
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is not None:
                        _adopt(message["data"].decode())
            except (redis.RedisError, OSError):
                self.live = False
                time.sleep(1.0)


_listener = _Listener()


def _adopt(generation: str | None) -> None:
    global _generation
    if generation is not None and generation != _generation:
        with _lock:
            _entries.clear()
            _generation = generation


def _shared_generation() -> str:
    generation = shared.get(GENERATION_KEY)
    if generation is None:
        shared.add(GENERATION_KEY, uuid.uuid4().hex, None)
        generation = shared.get(GENERATION_KEY)
    return generation


def refresh() -> None:
    """Call once per request: drop everything if configuration changed."""
    if _listener.live:
        return  # changes are pushed to this process as they happen
    if shared.redis_url() is not None:  # without Redis the generation is in this process's memory
        offline.needs_io("the configuration generation")
    _listener.ensure_started()
    _adopt(_shared_generation())


def changed() -> None:
    """Configuration changed: every process drops its cache at once."""
    generation = uuid.uuid4().hex
    shared.set(GENERATION_KEY, generation, None)
    with _lock:
        _entries.clear()
    shared.publish(CHANNEL, generation)


def _cached(key: tuple, load):
    now = time.monotonic()
    hit = _entries.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    offline.needs_io("configuration")
    value = load()
    _entries[key] = (now + TTL_S, value)
    return value


def api_key(secret: str | None) -> ApiKey:
    """The live key for this secret (raises KeyRejected); only valid keys are cached."""
    if not secret:
        return key_for_secret(secret=secret)
    return _cached(("key", hash_key(secret)), lambda: key_for_secret(secret=secret))


def key_needs_touch(key_id: int, resolution_s: float, *, mark: bool = True) -> bool:
    """True at most once per `resolution_s` per process and key (with
    mark=False: whether it would be, without counting this as the time)."""
    now = time.monotonic()
    if now - _touched.get(key_id, -1e9) < resolution_s:
        return False
    if mark:
        _touched[key_id] = now
    return True


def priced(name: str, at: datetime) -> PricedModel:
    def load():
        model = LanguageModel.objects.filter(name=name, is_active=True).first()
        prices = list(ModelPrice.objects.filter(model=model).order_by("-effective_from")) if model else []
        return model, prices

    model, prices = _cached(("model", name), load)
    if model is None:
        raise UnknownModel(name)
    for price in prices:
        if price.effective_from <= at:
            return PricedModel(model=model, price=price)
    raise ModelNotPriced(name)


def budgets(app: Application, key: ApiKey) -> list[Budget]:
    """Active budgets that can apply to this application or key (the caller
    narrows them to the request's end user and step)."""
    from django.db.models import Q

    return _cached(
        ("budgets", app.pk, key.pk),
        lambda: list(
            Budget.objects.filter(
                Q(scope=Budget.Scope.ORGANISATION) | Q(application=app) | Q(api_key=key), is_active=True
            ).order_by("pk")
        ),
    )


def step_policies(app: Application) -> dict[str, StepPolicy]:
    return _cached(("steps", app.pk), lambda: {p.step: p for p in StepPolicy.objects.filter(application=app)})


def ladder(app: Application) -> list[DegradationRule]:
    return _cached(("ladder", app.pk), lambda: list(DegradationRule.objects.filter(application=app)))


def fallbacks(app: Application) -> list[FallbackRoute]:
    return _cached(("fallbacks", app.pk), lambda: list(FallbackRoute.objects.filter(application=app).order_by("position", "pk")))
