"""The latest totals of each budget period this process has seen, so that a
degradation ladder can be evaluated without a query of its own under load.

Why: with a ladder set, the gateway read the budgets' utilisation with one
query before every call. Under load that was a round trip per request on a
database thread (about a tenth of the gateway's and Postgres' CPU at c=200)
for a figure that is already stale when the call is opened: the requests in
flight move it. On Postgres every open and finish returns the period rows it
has just locked and written, so the same figure, a few milliseconds old under
load, is at hand; it is used while younger than
GATEWAY["LADDER_READING_MAX_AGE_MS"], and read again when older or unseen.

Only the ladder (a soft policy) reads from here. Hard caps are checked by the
open itself, under the period rows' locks.
"""

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

# Keys of periods not seen for this long are dropped when the store grows
# past _PRUNE_AT entries (per-end-user budgets make one period per user).
_PRUNE_AT = 10_000


@dataclass(frozen=True, slots=True)
class Reading:
    seen_at: float  # time.monotonic()
    spent_usd: Decimal
    reserved_usd: Decimal
    spent_tokens: int
    reserved_tokens: int


PeriodKey = tuple[int, str, datetime]  # budget id, subject, period start

_lock = threading.Lock()
_period_of: dict[PeriodKey, int] = {}
_by_period: dict[int, Reading] = {}


def observe(rows, keys: dict[int, PeriodKey] | None = None) -> None:
    """Remember period rows as just read or written: dicts with the open and
    finish functions' fields (id, budget_id, spent_usd, ...). `keys` (budget
    id -> its key for the request) ties rows to the keys the ladder asks by;
    rows of periods whose key is not known yet are still kept by id."""
    now = time.monotonic()
    with _lock:
        for row in rows:
            period_id = row["id"]
            _by_period[period_id] = Reading(
                now, Decimal(row["spent_usd"]), Decimal(row["reserved_usd"]), row["spent_tokens"], row["reserved_tokens"]
            )
            if keys and row["budget_id"] in keys:
                _period_of[keys[row["budget_id"]]] = period_id
        if len(_by_period) > _PRUNE_AT:
            _prune(now)


def fresh(keys: list[PeriodKey], max_age_s: float) -> list[Reading] | None:
    """The readings of all these periods, if every one is younger than
    max_age_s; else None (the caller reads them from the database)."""
    if max_age_s <= 0:
        return None
    oldest = time.monotonic() - max_age_s
    out = []
    with _lock:
        for key in keys:
            period_id = _period_of.get(key)
            reading = _by_period.get(period_id) if period_id is not None else None
            if reading is None or reading.seen_at < oldest:
                return None
            out.append(reading)
    return out


def forget() -> None:
    """Drop everything (tests; a process that must read afresh)."""
    with _lock:
        _period_of.clear()
        _by_period.clear()


def _prune(now: float) -> None:
    from django.conf import settings

    oldest = now - max(settings.GATEWAY["LADDER_READING_MAX_AGE_MS"] / 1000, 1.0)
    stale = {pid for pid, r in _by_period.items() if r.seen_at < oldest}
    for pid in stale:
        del _by_period[pid]
    for key in [k for k, pid in _period_of.items() if pid in stale]:
        del _period_of[key]
