"""What the gateway does to a request before it is sent: step caps, input
truncation, the degradation ladder, and the worst case to reserve.

Pure decisions over data the caller loaded; every change is written down as a
decision dict that ends up on the call record."""

import math
from dataclasses import dataclass, field
from decimal import Decimal

from budgets.models import DegradationRule, LanguageModel, ModelPrice, StepPolicy
from budgets.selectors import priced_model

MARKER = "[… {n} tokens removed by the gateway to fit the input limit …]"
ESTIMATE_MARGIN = Decimal("1.10")  # substitute encodings can under-count; hold 10 % more
ESTIMATE_SLACK = 16


@dataclass
class Plan:
    model: LanguageModel
    price: ModelPrice
    messages: list[dict]
    input_tokens: int
    input_is_estimate: bool
    max_tokens: int | None
    decisions: list[dict] = field(default_factory=list)
    refusal: dict | None = None  # {"mode": "error"|"polite", "reason": ..., "rule": id}

    @property
    def degraded(self) -> bool:
        return any(d["kind"] in DEGRADING for d in self.decisions)


DEGRADING = {"model_switched", "max_tokens_capped", "turns_trimmed", "input_truncated"}


def _truncate_text(text: str, *, keep_tokens: int, encoder, middle: bool) -> tuple[str, int]:
    ids = encoder.encode(text, disallowed_special=())
    if len(ids) <= keep_tokens:
        return text, 0
    cut = len(ids) - keep_tokens
    marker = MARKER.format(n=cut)
    if middle:
        head = keep_tokens // 2
        tail = keep_tokens - head
        return encoder.decode(ids[:head]) + "\n" + marker + "\n" + encoder.decode(ids[len(ids) - tail :]), cut
    return marker + "\n" + encoder.decode(ids[cut:]), cut


def fit_input(*, messages: list[dict], limit: int, strategy: str, count, encoder) -> tuple[list[dict], int, int]:
    """Shrink `messages` to at most `limit` tokens: drop the oldest non-system
    turns (keeping the last), then shorten the longest message with a visible
    marker. Returns (messages, tokens now, tokens cut)."""
    msgs = [dict(m) for m in messages]
    before = count(msgs)
    total = before
    if strategy == StepPolicy.Oversize.TRUNCATE_OLDEST:
        while total > limit:
            droppable = [i for i, m in enumerate(msgs[:-1]) if m.get("role") not in ("system", "developer")]
            if not droppable:
                break
            del msgs[droppable[0]]
            # a tool answer without its call would be rejected by the provider
            while droppable[0] < len(msgs) - 1 and msgs[droppable[0]].get("role") == "tool":
                del msgs[droppable[0]]
            total = count(msgs)
    guard = 0
    while total > limit and guard < 8:
        guard += 1
        idx = max(
            (i for i, m in enumerate(msgs) if isinstance(m.get("content"), str)),
            key=lambda i: len(msgs[i]["content"]),
            default=None,
        )
        if idx is None:
            break
        own = len(encoder.encode(msgs[idx]["content"], disallowed_special=()))
        keep = max(0, own - (total - limit) - 24)  # 24: room for the marker itself
        msgs[idx]["content"], _ = _truncate_text(msgs[idx]["content"], keep_tokens=keep, encoder=encoder, middle=True)
        total = count(msgs)
    return msgs, total, max(0, before - total)


def worst_case(*, price: ModelPrice, input_tokens: int, is_estimate: bool, max_tokens: int) -> tuple[Decimal, int]:
    """The most this call can cost and use: all input uncached, every allowed
    output token produced (with a margin where the count is an estimate)."""
    if is_estimate:
        input_tokens = math.ceil(input_tokens * ESTIMATE_MARGIN) + ESTIMATE_SLACK
    tokens = input_tokens + max_tokens
    usd = (Decimal(input_tokens) * price.input_per_million + Decimal(max_tokens) * price.output_per_million) / Decimal(1_000_000)
    return usd, tokens


def apply_ladder(
    *, plan: Plan, rules: list[DegradationRule], utilisation: dict[int, float], count_for, priced_for=None
) -> Plan:
    """Apply every rule whose threshold is reached, in threshold order."""
    if not rules:
        return plan
    top = max(utilisation.values(), default=0.0)
    for rule in sorted(rules, key=lambda r: (r.threshold_percent, r.position)):
        used = utilisation.get(rule.budget_id, 0.0) if rule.budget_id else top
        if used < float(rule.threshold_percent):
            continue
        why = {"rule": rule.pk, "threshold_percent": float(rule.threshold_percent), "utilisation_percent": round(used, 2)}
        if rule.refuse:
            plan.refusal = {"mode": rule.refusal_mode, "reason": "degradation_ladder", **why}
            plan.decisions.append({"kind": "refused", "by": "degradation_ladder", "mode": rule.refusal_mode, **why})
            return plan
        if rule.switch_to_model and rule.switch_to_model != plan.model.name:
            target = (priced_for or (lambda name: priced_model(name=name)))(rule.switch_to_model)
            plan.decisions.append({"kind": "model_switched", "from": plan.model.name, "to": target.model.name, **why})
            plan.model, plan.price = target.model, target.price
            plan.input_tokens, plan.input_is_estimate = count_for(plan.messages, plan.model)
        if rule.max_tokens_cap and (plan.max_tokens is None or plan.max_tokens > rule.max_tokens_cap):
            plan.decisions.append({"kind": "max_tokens_capped", "from": plan.max_tokens, "to": rule.max_tokens_cap, **why})
            plan.max_tokens = rule.max_tokens_cap
        if rule.keep_last_turns:
            system = [m for m in plan.messages if m.get("role") in ("system", "developer")]
            others = [m for m in plan.messages if m.get("role") not in ("system", "developer")]
            if len(others) > rule.keep_last_turns:
                kept = others[-rule.keep_last_turns :]
                while kept and kept[0].get("role") == "tool":  # never start with an orphan tool answer
                    kept = kept[1:]
                before = plan.input_tokens
                plan.messages = system + kept
                plan.input_tokens, plan.input_is_estimate = count_for(plan.messages, plan.model)
                plan.decisions.append(
                    {"kind": "turns_trimmed", "kept": len(kept), "dropped": len(others) - len(kept), "tokens_cut": before - plan.input_tokens, **why}
                )
    return plan
