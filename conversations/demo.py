"""Demo history for `quickstart`: a few days of plausible support
conversations, so the admin is not empty on first look.

Rows are written as they would have been recorded (final calls with the price
then in force and exact costs); nothing here is used outside the demo.
"""

import random
import uuid
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from budgets.selectors import cost_of, priced_model
from conversations.gateway.tokens import count_messages, count_text
from conversations.models import Conversation, Message, ProviderCall
from conversations.services import sha256
from governance.models import ApiKey, Application

SYSTEM = "You are Acme's support assistant. Answer briefly and politely; never promise refunds."

DIALOGUES = [
    ("How do I reset my password? The link in the email says it expired.",
     "Reset links expire after 30 minutes. Go to Settings → Security → Reset password to get a fresh link, and open it on the same device.",
     "Got it, the new link worked. Can I turn on two-factor too?",
     "Yes: Settings → Security → Two-factor authentication. Scan the QR code with your authenticator app and enter the 6-digit code to confirm."),
    ("My invoice for March shows two charges for the Pro plan.",
     "I'm sorry about that. Two charges usually mean a plan change mid-cycle: one is the prorated old plan, one the new plan. Could you share the invoice number so a billing agent can check?",
     "INV-2291. I never changed plans though.",
     "Thanks. I've flagged INV-2291 for the billing team; they reply within one business day. I can't issue refunds myself, but they can."),
    ("Can I export all my projects to CSV?",
     "Yes. Open Projects, select the ones you want (or all), then Export → CSV. Large exports are emailed to you as a link.",
     None, None),
    ("The mobile app crashes when I open notifications on Android 14.",
     "Thanks for reporting it. Version 5.2.1 fixes a crash on Android 14 notifications; please update from the Play Store and tell me if it still happens.",
     "Updated, still crashes.",
     "Sorry to hear that. Please send a crash report via Settings → Help → Report a problem; it attaches the logs our engineers need."),
    ("Do you support SSO with Okta?",
     "Yes, SAML SSO with Okta is available on the Business plan. An admin configures it under Organisation → Security → Single sign-on.",
     None, None),
    ("How do I delete my account and all my data?",
     "Go to Settings → Account → Delete account. Your data is removed within 30 days; invoices are kept as the law requires.",
     "Is there a way to download my data first?",
     "Yes: Settings → Privacy → Download my data prepares an archive and emails you a link when it's ready."),
    ("Why was I charged in EUR when I'm in the UK?",
     "Your billing country decides the currency. If it's set to an EU country, invoices are in EUR. You can change it under Billing → Details before the next cycle.",
     None, None),
    ("Is there an API rate limit?",
     "Yes: 600 requests per minute per token on the Pro plan, 3,000 on Business. Responses include X-RateLimit-Remaining so you can back off in time.",
     None, None),
]

MODELS = ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]
USERS = [f"user-{n:04d}" for n in (17, 42, 108, 256, 311, 404, 512, 777, 901, 1024)]


def _messages(rows, *, conv, call, when):
    out = []
    for position, (role, text) in enumerate(rows):
        out.append(
            Message(
                conversation=conv, call=call, direction=Message.Direction.REQUEST, position=position,
                role=role, content=text, content_sha256=sha256(role + "\x1f" + text + "\x1f"), created_at=when,
            )
        )
    return out


@transaction.atomic
def seed_history(*, application: Application, api_key: ApiKey, days: int = 4, conversations: int = 48, seed: int = 7) -> int:
    """Create `conversations` demo conversations over the last `days` days."""
    rng = random.Random(seed)
    now = timezone.now()
    made = 0
    for i in range(conversations):
        q1, a1, q2, a2 = DIALOGUES[i % len(DIALOGUES)]
        start = now - timedelta(days=rng.uniform(0.05, days), minutes=rng.randint(0, 50))
        model_name = rng.choice(MODELS)
        priced = priced_model(name=model_name, at=start)
        user = rng.choice(USERS)
        conv = Conversation.objects.create(
            application=application, external_id=f"demo-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}",
            end_user=user, title=q1[:120], started_at=start, last_activity_at=start,
        )
        history = [("system", SYSTEM)]
        turns = [(q1, a1)] + ([(q2, a2)] if q2 else [])
        when = start
        for turn, (question, answer) in enumerate(turns):
            history.append(("user", question))
            prompt = count_messages([{"role": r, "content": c} for r, c in history], encoding=priced.model.encoding)
            failed = rng.random() < 0.06
            completion = 0 if failed else count_text(answer, encoding=priced.model.encoding).tokens
            cached = 0 if turn == 0 or prompt.tokens < 1024 else (prompt.tokens // 128) * 128
            provider_ms = rng.randint(450, 2400)
            call = ProviderCall.objects.create(
                request_id="req_" + uuid.UUID(int=rng.getrandbits(128)).hex,
                application=application, api_key=api_key, key_prefix=api_key.prefix, conversation=conv,
                end_user=user, model_requested=model_name, model_used=model_name,
                parameters={"temperature": 0.3}, stream=rng.random() < 0.5,
                status=ProviderCall.Status.FAILED if failed else ProviderCall.Status.SUCCEEDED,
                outcome=ProviderCall.Outcome.FAILED if failed else ProviderCall.Outcome.ANSWERED,
                http_status=504 if failed else 200,
                error_type="api_error" if failed else "", error_code="upstream_timeout" if failed else "",
                error_message="The provider did not answer in time." if failed else "",
                estimated_prompt_tokens=prompt.tokens, token_count_is_estimate=prompt.is_estimate,
                prompt_tokens=prompt.tokens, completion_tokens=completion, cached_tokens=cached,
                reasoning_tokens=0, total_tokens=prompt.tokens + completion,
                usage_source="estimated" if failed else "provider", price=priced.price,
                cost_usd=cost_of(price=priced.price, prompt_tokens=prompt.tokens, completion_tokens=completion, cached_tokens=cached),
                provider_response_id="" if failed else "chatcmpl-" + uuid.UUID(int=rng.getrandbits(128)).hex[:24],
                finish_reason="" if failed else "stop", latency_ms=provider_ms + rng.randint(2, 9),
                provider_latency_ms=provider_ms, created_at=when, completed_at=when + timedelta(milliseconds=provider_ms),
            )
            rows = _messages(history, conv=conv, call=call, when=when)
            if not failed:
                rows.append(
                    Message(
                        conversation=conv, call=call, direction=Message.Direction.RESPONSE, position=0,
                        role="assistant", content=answer, content_sha256=sha256("assistant\x1f" + answer + "\x1f"),
                        created_at=when,
                    )
                )
                history.append(("assistant", answer))
            Message.objects.bulk_create(rows)
            conv.call_count += 1
            conv.total_tokens += call.total_tokens
            conv.total_cost_usd += call.cost_usd
            conv.last_activity_at = when
            if failed:
                break
            when += timedelta(minutes=rng.randint(1, 6))
        conv.save(update_fields=["call_count", "total_tokens", "total_cost_usd", "last_activity_at"])
        made += 1
    return made
