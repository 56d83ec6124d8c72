"""Everything the gateway decides before the provider is asked: who is
calling, which model at what price, how many tokens (prepare, one section on a
database thread), and the opened call record (one transaction; on Postgres
shared with concurrent requests by group commit, awaited on the event loop).

A refusal is recorded here too, so a request that reached the gateway always
leaves a record, and a refused one leaves nothing else.
"""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from django.conf import settings
from django.core.exceptions import SynchronousOnlyOperation
from django.utils import timezone

from budgets.models import LanguageModel, ModelPrice
from budgets.policy import Plan, apply_ladder, fit_input, worst_case
from budgets.selectors import ModelNotPriced, UnknownModel
from budgets.services import BudgetExceeded, applicable_budgets, current_utilisation, recent_utilisation
from conversations import services
from conversations.gateway.errors import GatewayError, PoliteRefusal, auth_error, invalid
from conversations.gateway import config_cache, metrics, offline, ratelimit
from conversations.gateway.attempts import Policy, Route
from conversations.gateway.dbsection import db_section
from conversations.gateway.provider import Upstream
from conversations.gateway.tokens import count_messages, encoder_for
from conversations.gateway.validation import ChatRequest, text_of
from governance.models import ApiKey
from governance.selectors import KeyRejected
from governance.services import touch_key

log = structlog.get_logger("gateway")

_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_STEP = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class Headers:
    """The gateway's optional request headers, read once."""

    authorization: str
    conversation_id: str
    end_user: str
    step: str

    @classmethod
    def from_meta(cls, meta) -> "Headers":
        return cls(
            authorization=meta.get("HTTP_AUTHORIZATION", ""),
            conversation_id=meta.get("HTTP_X_CONVERSATION_ID", "").strip(),
            end_user=meta.get("HTTP_X_END_USER", "").strip(),
            step=meta.get("HTTP_X_STEP", "").strip(),
        )

    def secret(self) -> str:
        scheme, _, value = self.authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def check(self) -> None:
        if self.conversation_id and not _ID.match(self.conversation_id):
            raise invalid(
                "X-Conversation-ID must be 1-128 printable ASCII characters without spaces.",
                code="invalid_header",
                param="X-Conversation-ID",
            )
        if self.end_user and len(self.end_user) > 128:
            raise invalid("X-End-User must be at most 128 characters.", code="invalid_header", param="X-End-User")
        if self.step and not _STEP.match(self.step):
            raise invalid(
                "X-Step must be 1-64 characters of letters, digits, '_', '.' or '-'.",
                code="invalid_header",
                param="X-Step",
            )


@dataclass
class Admitted:
    opened: services.OpenedCall
    call_id: int
    conversation_external_id: str
    api_key: ApiKey
    routes: list[Route]
    policy: Policy
    estimated_prompt_tokens: int
    model_encoding: str
    degraded: bool = False
    reservation: dict | None = None
    cache_key: str = ""
    cache_ttl_s: int = 0
    failure_reply: str = "error"
    slow_message: str = ""
    down_message: str = ""
    # Milliseconds per phase, for the Server-Timing header: where a slow
    # answer spent its time (waiting for a database thread, the open's
    # transaction, the provider, the record) is visible to the caller.
    timing: dict[str, float] = field(default_factory=dict)

    def took(self, phase: str, since: float, until: float | None = None) -> None:
        """Record a phase's milliseconds, from since to until (default: now)."""
        self.timing[phase] = round(((until or time.perf_counter()) - since) * 1000, 1)


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _payload(chat: ChatRequest, plan: Plan, app, model: LanguageModel) -> dict:
    payload = {"model": model.provider_model, "messages": plan.messages, **chat.extra}
    temperature = chat.temperature if chat.temperature is not None else app.default_temperature
    if temperature is not None:
        payload["temperature"] = float(temperature)
    if chat.top_p is not None:
        payload["top_p"] = chat.top_p
    if plan.max_tokens:
        payload[chat.max_tokens_field] = plan.max_tokens
    if chat.user:
        payload["user"] = chat.user
    if chat.stream:
        # Always ask for usage so the call is recorded with the provider's
        # counts; the client only sees the usage chunk if it asked for it.
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return payload


def _routes(app, chat: ChatRequest, plan: Plan) -> list[Route]:
    """The primary model, then each fallback with a price in force (a fallback
    that cannot be priced is skipped and said so)."""
    routes = [Route(plan.model, plan.price, Upstream.for_application(app), _payload(chat, plan, app, plan.model))]
    seen = {(routes[0].upstream.base_url, plan.model.name)}
    for fb in config_cache.fallbacks(app):
        upstream = Upstream.for_application(app, base_url=fb.provider_base_url, api_key=fb.provider_api_key)
        if (upstream.base_url, fb.model) in seen:
            continue
        try:
            priced = config_cache.priced(fb.model, timezone.now())
        except (UnknownModel, ModelNotPriced):
            plan.decisions.append({"kind": "fallback_skipped", "model": fb.model, "why": "not catalogued or no price in force"})
            continue
        seen.add((upstream.base_url, fb.model))
        routes.append(Route(priced.model, priced.price, upstream, _payload(chat, plan, app, priced.model), fallback=True))
    return routes


def _limits(app, api_key: ApiKey) -> list[ratelimit.Limit]:
    limits = []
    if api_key.requests_per_minute or api_key.tokens_per_minute:
        limits.append(ratelimit.Limit("key", api_key.pk, api_key.requests_per_minute, api_key.tokens_per_minute))
    if app.requests_per_minute or app.tokens_per_minute:
        limits.append(ratelimit.Limit("application", app.pk, app.requests_per_minute, app.tokens_per_minute))
    return limits


def _cache_key(app, payload: dict) -> str:
    """Exact match on model, messages and parameters, within one application."""
    import hashlib

    import orjson

    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"respcache:{app.pk}:{digest}"


def _count_for(messages: list[dict], model: LanguageModel) -> tuple[int, bool]:
    count = count_messages(messages, encoding=model.encoding)
    return count.tokens, count.is_estimate


def _apply_step_policy(plan: Plan, *, app, step: str) -> None:
    """The step's (or the application's default) input and output caps."""
    policies = config_cache.step_policies(app)
    policy = policies.get(step) or policies.get("")
    if policy is None:
        return
    which = {"policy": policy.pk, "step": policy.step or "(default)"}
    if policy.max_output_tokens and (plan.max_tokens is None or plan.max_tokens > policy.max_output_tokens):
        plan.decisions.append({"kind": "max_tokens_capped", "from": plan.max_tokens, "to": policy.max_output_tokens, **which})
        plan.max_tokens = policy.max_output_tokens
    limit = policy.max_input_tokens
    if not limit or plan.input_tokens <= limit:
        return
    if policy.oversize == policy.Oversize.REFUSE:
        plan.decisions.append({"kind": "refused", "by": "input_limit", "input_tokens": plan.input_tokens, "limit": limit, **which})
        raise GatewayError(
            413,
            f"The input is about {plan.input_tokens:,} tokens; step '{policy.step or '(default)'}' accepts at most {limit:,}. "
            "Shorten the conversation or the pasted text.",
            "input_too_large",
            param="messages",
        )
    offline.needs_io("truncating the input")
    messages, tokens, cut = fit_input(
        messages=plan.messages,
        limit=limit,
        strategy=policy.oversize,
        count=lambda msgs: _count_for(msgs, plan.model)[0],
        encoder=encoder_for(plan.model.encoding),
    )
    plan.decisions.append(
        {"kind": "input_truncated", "strategy": policy.oversize, "tokens_before": plan.input_tokens, "tokens_after": tokens, "tokens_cut": cut,
         "messages_before": len(plan.messages), "messages_after": len(messages), "limit": limit, **which}
    )
    plan.messages, plan.input_tokens = messages, tokens


def _refusal_mode(rules: list) -> str:
    """Hard-cap refusals speak the way the ladder's refusal rung does."""
    refusing = [r for r in rules if r.refuse]
    return max(refusing, key=lambda r: r.threshold_percent).refusal_mode if refusing else "error"


def _budget_refusal(app, mode: str, message: str) -> GatewayError:
    if mode == "polite":
        return PoliteRefusal(200, app.polite_refusal_message, "budget_exceeded", reason=message)
    return GatewayError(429, message, "budget_exceeded", type="insufficient_quota")


def _record_refusal(err: GatewayError, request_id: str, started: float, **fields) -> GatewayError:
    """Record a request refused before the provider was asked; returns the error to raise."""
    offline.needs_io("recording a refusal")
    services.record_rejection(
        request_id=request_id,
        http_status=err.http_status,
        status=err.status,
        outcome=err.outcome,
        error_type=err.type,
        error_code=err.code,
        error_message=err.reason if isinstance(err, PoliteRefusal) else err.message,
        latency_ms=_elapsed_ms(started),
        **fields,
    )
    return err


@dataclass
class Pending:
    """An admitted request whose call is not opened yet: what opening takes,
    and what the gateway needs afterwards."""

    open_fields: dict
    refuse: Callable[..., GatewayError]
    rules: list
    plan: Plan
    app: object
    api_key: ApiKey
    chat: ChatRequest
    routes: list[Route]
    policy: Policy
    limits: list[ratelimit.Limit] = field(default_factory=list)  # still to count (prepare's count_later)
    limit_tokens: int = 0

    def rate_limited(self, err: GatewayError) -> GatewayError:
        """Records the refusal (on a database thread) and returns it."""
        return self.refuse(err, decisions=_rate_limited(self.plan.decisions))

    def over_budget(self, exc: BudgetExceeded) -> GatewayError:
        """Records the refusal (a query: on a database thread) and returns it."""
        mode = _refusal_mode(self.rules)
        decision = {
            "kind": "refused", "by": "hard_cap", "mode": mode, "budget": exc.budget.pk, "budget_name": exc.budget.name,
            "unit": exc.unit, "needed_usd": str(exc.needed_usd), "needed_tokens": exc.needed_tokens,
        }
        return self.refuse(_budget_refusal(self.app, mode, exc.message), decisions=[*self.plan.decisions, decision])

    def admitted(self, opened: services.OpenedCall, holds: list) -> Admitted:
        app, plan, chat, routes = self.app, self.plan, self.chat, self.routes
        reservation = None
        if holds:
            reservation = {
                "kind": "budget_reserved",
                "worst_case_usd": str(self.open_fields["hold_usd"]),
                "worst_case_tokens": self.open_fields["hold_tokens"],
                "budgets": [
                    {"id": h.budget_id, "name": h.budget_name, "utilisation_percent": round(h.utilisation_after, 2)}
                    for h in holds
                ],
            }
        return Admitted(
            opened=opened,
            call_id=opened.call_id,
            conversation_external_id=opened.conversation_external_id,
            api_key=self.api_key,
            routes=routes,
            policy=self.policy,
            estimated_prompt_tokens=plan.input_tokens,
            model_encoding=plan.model.encoding,
            degraded=plan.degraded,
            reservation=reservation,
            cache_key=_cache_key(app, routes[0].payload) if app.response_cache_ttl_s and not chat.stream else "",
            cache_ttl_s=app.response_cache_ttl_s,
            failure_reply=app.failure_reply,
            slow_message=app.slow_message,
            down_message=app.down_message,
        )


def admit(**request) -> Admitted:
    """Authenticate (unless the caller already did: the native API), resolve,
    count and open the call, or record why not and raise. Takes prepare's
    arguments; runs on a database thread."""
    pending = prepare(**request)
    try:
        opened, holds = services.open_call_with_holds(**pending.open_fields)
    except BudgetExceeded as exc:
        raise pending.over_budget(exc) from None
    return pending.admitted(opened, holds)


async def admit_async(**request) -> Admitted:
    """admit from the event loop. On Postgres, prepare runs on the loop when
    it needs no I/O (conversations/gateway/offline.py), else on a database
    thread, where a lone open is written in the same section; every other
    open is written by group commit while the request waits on the loop."""
    from conversations import recording_sql

    t0 = time.perf_counter()
    if not services.sql_recording():
        admitted = await db_section(admit, **request)
        admitted.took("admit", t0)
        return admitted
    try:
        with offline.io_forbidden():  # most requests: decided from memory, here on the loop
            pending = prepare(**request, count_later=True)
            open_request = recording_sql.OpenRequest.of(**pending.open_fields)
        opened = None
        metrics.ADMISSIONS.labels("loop", "").inc()
    except (offline.NeedsIO, SynchronousOnlyOperation) as needed:
        if isinstance(needed, SynchronousOnlyOperation):  # a database read nobody declared: still served, but said
            log.warning("gateway.undeclared_io_in_admission", request_id=request["request_id"])
        metrics.ADMISSIONS.labels("thread", str(needed) if isinstance(needed, offline.NeedsIO) else "undeclared").inc()
        pending, open_request, opened = await db_section(_prepare_and_open_if_idle, **request)
    if pending.limits:  # admitted on the loop: the rate limits are counted in Redis from here
        try:
            await ratelimit.check_async(limits=pending.limits, tokens=pending.limit_tokens)
        except GatewayError as err:
            raise (await db_section(pending.rate_limited, err=err)) from None
    t1 = time.perf_counter()
    if opened is None:
        try:
            opened = await recording_sql.open_call_with_holds_async(open_request)
        except BudgetExceeded as exc:
            raise (await db_section(pending.over_budget, exc=exc)) from None
    admitted = pending.admitted(*opened)
    admitted.took("admit", t0, t1)
    admitted.took("open", t1)
    return admitted


def _prepare_and_open_if_idle(**request) -> tuple:
    """prepare, then the open if no other is being written (else None)."""
    from conversations import recording_sql

    pending = prepare(**request)
    open_request = recording_sql.OpenRequest.of(**pending.open_fields)
    try:
        return pending, open_request, recording_sql.open_call_if_idle(open_request)
    except BudgetExceeded as exc:
        raise pending.over_budget(exc) from None


def prepare(
    *,
    request_id: str,
    headers: Headers,
    chat: ChatRequest | None,
    body_error: GatewayError | None,
    started: float,
    api_key: ApiKey | None = None,
    count_later: bool = False,
) -> Pending:
    """Everything before the call is opened: authentication, the request's
    checks, model and price, token count, budgets, ladder and rate limits. A
    refusal is recorded here and raised. With count_later the rate limits
    are left to the caller (Pending.limits), who counts them from the event
    loop (admit_async)."""
    try:
        config_cache.refresh()
        if api_key is None:
            api_key = config_cache.api_key(headers.secret())
    except KeyRejected as exc:
        raise _record_refusal(auth_error(exc.message, exc.code), request_id, started, key_prefix=exc.prefix) from None
    resolution = settings.GATEWAY["KEY_LAST_USED_RESOLUTION_S"]
    if config_cache.key_needs_touch(api_key.pk, resolution, mark=False):
        offline.needs_io("touching the key")
        if config_cache.key_needs_touch(api_key.pk, resolution):
            touch_key(api_key_id=api_key.pk, resolution_s=resolution)
    app = api_key.application
    end_user = headers.end_user or (chat.user if chat else "")
    model_name = (chat.model if chat else None) or app.default_model

    def refuse(err: GatewayError, **extra) -> GatewayError:
        return _record_refusal(
            err,
            request_id,
            started,
            api_key=api_key,
            model_requested=model_name or "",
            stream=bool(chat and chat.stream),
            end_user=end_user,
            step=headers.step,
            parameters=chat.parameters() if chat else {},
            **extra,
        )

    if body_error is not None:
        raise refuse(body_error)
    try:
        headers.check()
    except GatewayError as err:
        raise refuse(err) from None
    try:
        priced = config_cache.priced(model_name, timezone.now())
    except UnknownModel:
        raise refuse(
            GatewayError(
                404,
                f"The model '{model_name}' does not exist or is not enabled on this gateway. "
                "GET /v1/models lists the models you can use.",
                "model_not_found",
                param="model",
            )
        ) from None
    except ModelNotPriced:
        raise refuse(
            GatewayError(
                400,
                f"The model '{model_name}' has no price in force, so its cost cannot be accounted; "
                "it is refused until a manager sets its price.",
                "model_not_priced",
                param="model",
            )
        ) from None

    if offline.is_forbidden() and sum(len(text_of(m.get("content"))) for m in chat.messages) > offline.MAX_TEXT_ON_LOOP:
        offline.needs_io("counting a long input")
    count = count_messages(chat.messages, encoding=priced.model.encoding)
    plan = Plan(
        model=priced.model,
        price=priced.price,
        messages=chat.messages,
        input_tokens=count.tokens,
        input_is_estimate=count.is_estimate,
        max_tokens=chat.max_tokens or app.default_max_tokens,
    )
    budgets = applicable_budgets(
        candidates=config_cache.budgets(app, api_key), application=app, api_key=api_key, end_user=end_user, step=headers.step
    )
    try:
        _apply_step_policy(plan, app=app, step=headers.step)
    except GatewayError as err:
        raise refuse(err, decisions=plan.decisions) from None
    rules = config_cache.ladder(app)
    if rules:
        # On Postgres the opens and finishes return the period rows they
        # wrote, so a recent enough figure needs no query (budgets/readings.py).
        max_age_s = settings.GATEWAY["LADDER_READING_MAX_AGE_MS"] / 1000 if services.sql_recording() else 0.0
        utilisation = recent_utilisation(budgets=budgets, end_user=end_user, max_age_s=max_age_s)
        if utilisation is None:
            offline.needs_io("reading the budgets")
            utilisation = current_utilisation(budgets=budgets, end_user=end_user)
        apply_ladder(
            plan=plan, rules=rules, utilisation=utilisation, count_for=_count_for,
            priced_for=lambda name: config_cache.priced(name, timezone.now()),
        )
        if plan.refusal:
            raise refuse(
                _budget_refusal(app, plan.refusal["mode"], "The application's budget policy refuses new requests at this level of spend."),
                decisions=plan.decisions,
            )
    if budgets and plan.max_tokens is None:
        default = min(settings.GATEWAY["DEFAULT_MAX_OUTPUT_TOKENS"], max(1, plan.model.context_window - plan.input_tokens))
        plan.decisions.append({"kind": "max_tokens_defaulted", "to": default, "why": "a budget applies; the worst case must be bounded"})
        plan.max_tokens = default
    routes = _routes(app, chat, plan)
    hold_usd, hold_tokens = max(
        worst_case(price=r.price, input_tokens=plan.input_tokens, is_estimate=plan.input_is_estimate, max_tokens=plan.max_tokens or 0)
        for r in routes
    )
    limits = _limits(app, api_key)
    limit_tokens = plan.input_tokens + (plan.max_tokens or 0)
    if not count_later:
        try:
            ratelimit.check(limits=limits, tokens=limit_tokens)
        except GatewayError as err:
            raise refuse(err, decisions=_rate_limited(plan.decisions)) from None
    policy = Policy.for_application(app)
    upstream = routes[0].upstream
    open_fields = dict(
        budgets=budgets,
        hold_usd=hold_usd,
        hold_tokens=hold_tokens,
        ttl_s=max(settings.GATEWAY["RESERVATION_TTL_S"], policy.deadline_s + 30),
        request_id=request_id,
        api_key=api_key,
        conversation_external_id=headers.conversation_id or None,
        end_user=end_user,
        step=headers.step,
        stream=chat.stream,
        model_requested=model_name,
        model_used=plan.model.name,
        parameters=chat.parameters(),
        messages=plan.messages,
        price=plan.price,
        estimated_prompt_tokens=plan.input_tokens,
        token_count_is_estimate=plan.input_is_estimate,
        provider_base_url=upstream.base_url,
        decisions=plan.decisions,
    )
    return Pending(
        open_fields=open_fields, refuse=refuse, rules=rules, plan=plan, app=app, api_key=api_key, chat=chat,
        routes=routes, policy=policy, limits=limits if count_later else [], limit_tokens=limit_tokens,
    )


def _rate_limited(decisions: list) -> list:
    return [*decisions, {"kind": "refused", "by": "rate_limit"}]
