"""Period boundaries in a budget's own time zone.

A day budget in Europe/Paris runs from local midnight to local midnight,
whatever the server's zone, across DST changes (23- and 25-hour days)."""

from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from zoneinfo import ZoneInfo

LIFETIME_START = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=tz).astimezone(dt_timezone.utc)


_last: dict[tuple[str, str], tuple[datetime, datetime]] = {}


def period_bounds(*, period: str, tz_name: str, at: datetime) -> tuple[datetime, datetime | None]:
    """[start, end) in UTC of the period containing `at`."""
    if period == "none":
        return LIFETIME_START, None
    # Every request asks for the bounds of each budget that applies; they
    # change only at a period's end, so the last answer is reused while `at`
    # is inside it (time-zone arithmetic was a visible share of admission).
    last = _last.get((period, tz_name))
    if last is not None and last[0] <= at < last[1]:
        return last
    bounds = _compute(period=period, tz_name=tz_name, at=at)
    _last[period, tz_name] = bounds
    return bounds


def _compute(*, period: str, tz_name: str, at: datetime) -> tuple[datetime, datetime]:
    tz = ZoneInfo(tz_name)
    local = at.astimezone(tz).date()
    if period == "day":
        first, nxt = local, local + timedelta(days=1)
    elif period == "week":
        first = local - timedelta(days=local.weekday())
        nxt = first + timedelta(days=7)
    elif period == "month":
        first = local.replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return _local_midnight(first, tz), _local_midnight(nxt, tz)
