"""Everything the gateway decides before the provider is asked, in one
synchronous section (one thread hop, one short transaction): who is calling,
which model at what price, how many tokens, and the opened call record.

A refusal is recorded here too, so a request that reached the gateway always
leaves a record, and a refused one leaves nothing else.
"""

import re
import time
from dataclasses import dataclass

from django.conf import settings

from budgets.models import LanguageModel, ModelPrice
from budgets.selectors import ModelNotPriced, UnknownModel, priced_model
from conversations import services
from conversations.gateway.errors import GatewayError, auth_error, invalid
from conversations.gateway.provider import Upstream
from conversations.gateway.tokens import count_messages
from conversations.gateway.validation import ChatRequest
from governance.models import ApiKey
from governance.selectors import KeyRejected, key_for_secret
from governance.services import touch_key

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
    call_id: int
    conversation_external_id: str
    api_key: ApiKey
    model: LanguageModel
    price: ModelPrice
    upstream: Upstream
    payload: dict
    estimated_prompt_tokens: int


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _payload(chat: ChatRequest, model: LanguageModel, app) -> dict:
    payload = {"model": model.provider_model, "messages": chat.messages, **chat.extra}
    temperature = chat.temperature if chat.temperature is not None else app.default_temperature
    if temperature is not None:
        payload["temperature"] = float(temperature)
    if chat.top_p is not None:
        payload["top_p"] = chat.top_p
    max_tokens = chat.max_tokens or app.default_max_tokens
    if max_tokens:
        payload[chat.max_tokens_field] = max_tokens
    if chat.user:
        payload["user"] = chat.user
    if chat.stream:
        # Always ask for usage so the call is recorded with the provider's
        # counts; the client only sees the usage chunk if it asked for it.
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return payload


def admit(
    *,
    request_id: str,
    headers: Headers,
    chat: ChatRequest | None,
    body_error: GatewayError | None,
    started: float,
    api_key: ApiKey | None = None,
) -> Admitted:
    """Authenticate (unless the caller already did: the native API), resolve,
    count and open the call, or record why not and raise."""
    try:
        if api_key is None:
            api_key = key_for_secret(secret=headers.secret())
    except KeyRejected as exc:
        err = auth_error(exc.message, exc.code)
        services.record_rejection(
            request_id=request_id,
            http_status=err.http_status,
            status=err.status,
            outcome=err.outcome,
            error_type=err.type,
            error_code=err.code,
            error_message=err.message,
            latency_ms=_elapsed_ms(started),
            key_prefix=exc.prefix,
        )
        raise err from None
    touch_key(api_key_id=api_key.pk, resolution_s=settings.GATEWAY["KEY_LAST_USED_RESOLUTION_S"])
    app = api_key.application
    end_user = headers.end_user or (chat.user if chat else "")
    model_name = (chat.model if chat else None) or app.default_model

    def refuse(err: GatewayError, **extra) -> GatewayError:
        services.record_rejection(
            request_id=request_id,
            http_status=err.http_status,
            status=err.status,
            outcome=err.outcome,
            error_type=err.type,
            error_code=err.code,
            error_message=err.message,
            latency_ms=_elapsed_ms(started),
            api_key=api_key,
            model_requested=model_name or "",
            stream=bool(chat and chat.stream),
            end_user=end_user,
            step=headers.step,
            parameters=chat.parameters() if chat else {},
            **extra,
        )
        return err

    if body_error is not None:
        raise refuse(body_error)
    try:
        headers.check()
    except GatewayError as err:
        raise refuse(err) from None
    try:
        priced = priced_model(name=model_name)
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

    count = count_messages(chat.messages, encoding=priced.model.encoding)
    upstream = Upstream.for_application(app)
    payload = _payload(chat, priced.model, app)
    opened = services.open_call(
        request_id=request_id,
        api_key=api_key,
        conversation_external_id=headers.conversation_id or None,
        end_user=end_user,
        step=headers.step,
        stream=chat.stream,
        model_requested=model_name,
        model_used=priced.model.name,
        parameters=chat.parameters(),
        messages=chat.messages,
        price=priced.price,
        estimated_prompt_tokens=count.tokens,
        token_count_is_estimate=count.is_estimate,
        provider_base_url=upstream.base_url,
    )
    return Admitted(
        call_id=opened.call_id,
        conversation_external_id=opened.conversation_external_id,
        api_key=api_key,
        model=priced.model,
        price=priced.price,
        upstream=upstream,
        payload=payload,
        estimated_prompt_tokens=count.tokens,
    )
