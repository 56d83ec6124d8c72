"""Configuration the gateway reads on every request — the key and its
application, the model and its prices, budgets, step policies, the ladder and
fallbacks — cached in each process.

Entries live at most TTL_S seconds, and all are dropped as soon as the shared
configuration generation changes: every save or delete of a governing model
sets a new generation (governance/config_events.py), and each admission reads
it from the shared cache (one Redis GET). So a revoked key or a new price
takes effect on the next request in every worker; without Redis, other
processes see it within TTL_S. Spend and holds are never cached.
"""

import threading
import time
import uuid
from datetime import datetime

from budgets.models import Budget, DegradationRule, LanguageModel, ModelPrice, StepPolicy
from budgets.selectors import ModelNotPriced, PricedModel, UnknownModel
from conversations.gateway import shared
from governance.models import ApiKey, Application, FallbackRoute
from governance.selectors import key_for_secret
from governance.services import hash_key

TTL_S = 5.0
GENERATION_KEY = "config:generation"

_lock = threading.Lock()
_entries: dict[tuple, tuple[float, object]] = {}
_generation: str | None = None
_touched: dict[int, float] = {}


def _shared_generation() -> str:
    generation = shared.get(GENERATION_KEY)
    if generation is None:
        shared.add(GENERATION_KEY, uuid.uuid4().hex, None)
        generation = shared.get(GENERATION_KEY)
    return generation


def refresh() -> None:
    """Call once per request: drop everything if configuration changed."""
    global _generation
    generation = _shared_generation()
    if generation != _generation:
        with _lock:
            _entries.clear()
            _generation = generation


def changed() -> None:
    """Configuration changed: every process drops its cache on its next request."""
    shared.set(GENERATION_KEY, uuid.uuid4().hex, None)
    with _lock:
        _entries.clear()


def _cached(key: tuple, load):
    now = time.monotonic()
    hit = _entries.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    value = load()
    _entries[key] = (now + TTL_S, value)
    return value


def api_key(secret: str | None) -> ApiKey:
    """The live key for this secret (raises KeyRejected); only valid keys are cached."""
    if not secret:
        return key_for_secret(secret=secret)
    return _cached(("key", hash_key(secret)), lambda: key_for_secret(secret=secret))


def key_needs_touch(key_id: int, resolution_s: float) -> bool:
    """True at most once per `resolution_s` per process and key."""
    now = time.monotonic()
    if now - _touched.get(key_id, -1e9) < resolution_s:
        return False
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
