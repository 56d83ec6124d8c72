"""Cost regression: the cost per call (or per conversation) over a recent
window against a baseline window just before it. A rise beyond the rule's
ratio is written as a CostEvent, at most once per recent window."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Sum
from django.utils import timezone

from budgets.models import CostEvent, CostRegressionRule


@dataclass(frozen=True)
class Window:
    samples: int
    average_usd: Decimal | None


def _window(rule: CostRegressionRule, start: datetime, end: datetime) -> Window:
    from conversations.models import ProviderCall

    calls = ProviderCall.objects.filter(
        application=rule.application, created_at__gte=start, created_at__lt=end, cost_usd__isnull=False
    )
    agg = calls.aggregate(total=Sum("cost_usd"), calls=Count("id"), conversations=Count("conversation", distinct=True))
    samples = agg["calls"] if rule.metric == CostRegressionRule.Metric.PER_CALL else agg["conversations"]
    if not samples:
        return Window(0, None)
    return Window(samples, agg["total"] / samples)


@dataclass(frozen=True)
class Comparison:
    recent: Window
    baseline: Window
    ratio: Decimal | None
    regressed: bool


def compare(*, rule: CostRegressionRule, now: datetime | None = None) -> Comparison:
    now = now or timezone.now()
    recent_start = now - timedelta(hours=rule.recent_hours)
    recent = _window(rule, recent_start, now)
    baseline = _window(rule, recent_start - timedelta(days=rule.baseline_days), recent_start)
    enough = recent.samples >= rule.min_samples and baseline.samples >= rule.min_samples
    if not enough or not baseline.average_usd:
        return Comparison(recent, baseline, None, False)
    ratio = recent.average_usd / baseline.average_usd
    return Comparison(recent, baseline, ratio, ratio > rule.max_ratio)


def detect(*, rule: CostRegressionRule, now: datetime | None = None) -> CostEvent | None:
    now = now or timezone.now()
    result = compare(rule=rule, now=now)
    if not result.regressed:
        return None
    if CostEvent.objects.filter(rule=rule, created_at__gte=now - timedelta(hours=rule.recent_hours)).exists():
        return None  # already raised for this window
    return CostEvent.objects.create(
        kind=CostEvent.Kind.COST_REGRESSION,
        application=rule.application,
        rule=rule,
        message=(
            f"{rule.get_metric_display()} of '{rule.application}' rose ×{result.ratio:.2f} "
            f"(${result.recent.average_usd:.6f} in the last {rule.recent_hours} h vs ${result.baseline.average_usd:.6f} before)"
        ),
        details={
            "ratio": str(result.ratio.quantize(Decimal("0.0001"))),
            "recent_average_usd": str(result.recent.average_usd),
            "baseline_average_usd": str(result.baseline.average_usd),
            "recent_samples": result.recent.samples,
            "baseline_samples": result.baseline.samples,
        },
    )


def detect_all(*, now: datetime | None = None) -> int:
    return sum(1 for rule in CostRegressionRule.objects.filter(is_active=True).select_related("application") if detect(rule=rule, now=now))
