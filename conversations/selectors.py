"""Reads of an application's traffic for the people who audit it (admin).

The conversation timeline shows, per provider call, only what the bot added
since earlier calls. A chat client re-sends the whole history on every call, so
call N's request normally starts with call N-1's request followed by call
N-1's answer. Showing that prefix again for every call buries the one new user
turn under pages of repeats; the timeline shows it once and keeps the full
request one click away.

Messages are compared by (role, content_sha256), never by text, so the
comparison is cheap and exact (the hash covers structured parts too).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from django.db.models import Exists, OuterRef, Q, QuerySet

from conversations.models import Conversation, Message, ProviderCall

MessageKey = tuple[str, str]


@dataclass(frozen=True)
class TimelineEntry:
    """One provider call of a conversation, with its messages split up."""

    call: ProviderCall
    request_messages: list[Message]
    """Everything the bot sent with this call, in order."""
    new_messages: list[Message]
    """The tail of `request_messages` not already shown for an earlier call."""
    answers: list[Message]
    """What the provider answered (empty for failed or refused calls)."""
    follows_previous: bool
    """The request starts with the previous request of the same step: the
    ordinary case. False when the bot dropped or changed messages it had sent
    before (history trimming, an edited or forked conversation)."""

    @property
    def repeated_count(self) -> int:
        """How many leading request messages were already shown earlier."""
        return len(self.request_messages) - len(self.new_messages)

    @property
    def request_count(self) -> int:
        return len(self.request_messages)


@dataclass
class _TrieNode:
    children: dict[MessageKey, _TrieNode] = field(default_factory=dict)


def _message_key(message: Message) -> MessageKey:
    return (message.role, message.content_sha256)


@dataclass(frozen=True)
class PrefixSplit:
    shown: int
    """Leading request messages already shown for an earlier call."""
    follows_previous: bool
    """The request starts with the previous request of the same step."""


def split_requests(
    *, exchanges: list[tuple[list[MessageKey], list[MessageKey]]], steps: list[str] | None = None
) -> list[PrefixSplit]:
    """For each (request, answers) exchange in call order, how much of the
    request was already shown: the longest prefix it shares with any earlier
    exchange (an earlier call's request followed by its answers).

    In the ordinary chat flow that is exactly the previous call's exchange;
    taking the longest over all earlier calls also keeps interleaved steps
    (classify, answer, classify, ...) and retries from repeating history.
    A trie of earlier exchanges makes it linear in the number of messages.

    `follows_previous` tells whether the request still starts with the
    previous request of the same step (`steps[i]`, the call's X-Step; all one
    step when omitted): False means the bot dropped or changed messages it
    had sent before (trimmed or edited history). Answers are not required, so
    a step that re-sends the conversation without its own earlier output (a
    classifier, say) is not flagged.
    """
    root = _TrieNode()
    previous: dict[str, list[MessageKey]] = {}
    out: list[PrefixSplit] = []
    for i, (request, answers) in enumerate(exchanges):
        step = steps[i] if steps else ""
        node, shown = root, 0
        for key in request:
            child = node.children.get(key)
            if child is None:
                break
            node, shown = child, shown + 1
        before = previous.get(step)
        follows = before is None or not request or request[: len(before)] == before
        out.append(PrefixSplit(shown=shown, follows_previous=follows))

        exchange = [*request, *answers]
        node = root
        for key in exchange:
            node = node.children.setdefault(key, _TrieNode())
        if request:
            previous[step] = request
    return out


def conversation_timeline(*, conversation: Conversation) -> list[TimelineEntry]:
    """The conversation's provider calls in time order, each with everything
    it sent, the messages new relative to earlier calls (see
    `split_requests`), and its answers. Two queries whatever the length."""
    calls = list(
        ProviderCall.objects.filter(conversation=conversation)
        .select_related("application", "price")
        .order_by("created_at", "pk")
    )
    requests: dict[int, list[Message]] = defaultdict(list)
    answers: dict[int, list[Message]] = defaultdict(list)
    for message in Message.objects.filter(conversation=conversation).order_by(
        "call_id", "direction", "position", "pk"
    ):
        if message.direction == Message.Direction.RESPONSE:
            answers[message.call_id].append(message)
        else:
            requests[message.call_id].append(message)

    splits = split_requests(
        exchanges=[
            ([_message_key(m) for m in requests.get(c.pk, [])], [_message_key(m) for m in answers.get(c.pk, [])])
            for c in calls
        ],
        steps=[c.step for c in calls],
    )
    timeline: list[TimelineEntry] = []
    for call, split in zip(calls, splits):
        sent = requests.get(call.pk, [])
        timeline.append(
            TimelineEntry(
                call=call,
                request_messages=sent,
                new_messages=sent[split.shown :],
                answers=answers.get(call.pk, []),
                follows_previous=split.follows_previous,
            )
        )
    return timeline


# --- Changelist helpers -----------------------------------------------------------------

COST_BUCKETS: dict[str, tuple[str, Decimal | None, Decimal | None]] = {
    # value: (label, lower bound inclusive, upper bound exclusive)
    "lt_0.001": ("< $0.001", None, Decimal("0.001")),
    "0.001_0.01": ("$0.001 – $0.01", Decimal("0.001"), Decimal("0.01")),
    "0.01_0.10": ("$0.01 – $0.10", Decimal("0.01"), Decimal("0.10")),
    "gte_0.10": ("≥ $0.10", Decimal("0.10"), None),
}


def conversations_in_cost_bucket(*, queryset: QuerySet[Conversation], bucket: str) -> QuerySet[Conversation]:
    try:
        _, low, high = COST_BUCKETS[bucket]
    except KeyError:
        return queryset
    if low is not None:
        queryset = queryset.filter(total_cost_usd__gte=low)
    if high is not None:
        queryset = queryset.filter(total_cost_usd__lt=high)
    return queryset


def conversations_with_calls(
    *, queryset: QuerySet[Conversation], model_used: str | None = None, outcome: str | None = None
) -> QuerySet[Conversation]:
    """Conversations having at least one call matching all the given values.
    An EXISTS subquery, so no duplicates and no DISTINCT over the join."""
    q = Q()
    if model_used is not None:
        q &= Q(model_used=model_used)
    if outcome is not None:
        q &= Q(outcome=outcome)
    return queryset.filter(Exists(ProviderCall.objects.filter(q, conversation=OuterRef("pk"))))


def search_conversations(*, queryset: QuerySet[Conversation], term: str) -> QuerySet[Conversation]:
    """Admin search: a request id (exact, indexed) first; if no conversation
    has a call with that id, the term is looked for in titles, ids, end users
    and message text (case-insensitive substring). Both are subqueries, so
    the result has no duplicates."""
    term = term.strip()
    if not term:
        return queryset
    by_request = queryset.filter(
        pk__in=ProviderCall.objects.filter(request_id=term, conversation__isnull=False).values("conversation_id")
    )
    if by_request.exists():
        return by_request
    return queryset.filter(
        Q(external_id=term)
        | Q(title__icontains=term)
        | Q(end_user=term)
        | Q(pk__in=Message.objects.filter(content__icontains=term).values("conversation_id"))
    )
