"""Parse and check a chat-completions body before anything is spent.

Messages a developer can act on: the failing parameter is named in `param`
(e.g. `messages[2].role`), as OpenAI does."""

from dataclasses import dataclass, field
from typing import Any

import orjson

from conversations.gateway.errors import GatewayError, invalid

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

# Parameters forwarded to the provider as given (type-checked where cheap).
PASSTHROUGH = {
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
    "logit_bias": dict,
    "logprobs": bool,
    "top_logprobs": int,
    "stop": (str, list),
    "seed": int,
    "tools": list,
    "tool_choice": (str, dict),
    "parallel_tool_calls": bool,
    "response_format": dict,
    "functions": list,
    "function_call": (str, dict),
    "metadata": dict,
    "store": bool,
    "reasoning_effort": str,
    "service_tier": str,
    "modalities": list,
    "prediction": dict,
    "audio": dict,
    "web_search_options": dict,
    "verbosity": str,
    "prompt_cache_key": str,
    "safety_identifier": str,
}
HANDLED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "n", "user",
}


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    user: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict:
        """What is recorded on the call besides the messages."""
        out = {k: v for k, v in self.extra.items() if k not in ("tools", "functions", "logit_bias")}
        if "tools" in self.extra:
            out["tools"] = [t.get("function", {}).get("name") for t in self.extra["tools"] if isinstance(t, dict)]
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.max_tokens is not None:
            out[self.max_tokens_field] = self.max_tokens
        if self.stream:
            out["stream"] = True
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def text_of(content) -> str:
    """The text of a message's content, joining text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _check_text(value: str, param: str) -> None:
    if "\x00" in value:
        raise invalid(
            f"'{param}' contains a NUL character (\\u0000), which cannot be stored. Remove it and retry.",
            code="invalid_characters",
            param=param,
        )


def _check_message(i: int, msg) -> dict:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise invalid(f"'{where}' must be an object, got {_type_name(msg)}.", code="invalid_type", param=where)
    role = msg.get("role")
    if not isinstance(role, str):
        raise invalid(f"'{where}.role' is required and must be a string.", code="invalid_type", param=f"{where}.role")
    if role not in ROLES:
        raise invalid(
            f"'{where}.role' is '{role[:40]}', which is not a known role. Use one of: "
            + ", ".join(sorted(ROLES))
            + ".",
            code="invalid_role",
            param=f"{where}.role",
        )
    content = msg.get("content")
    has_tool_calls = bool(msg.get("tool_calls") or msg.get("function_call"))
    if content is None:
        if not (role == "assistant" and has_tool_calls):
            raise invalid(
                f"'{where}.content' is required for a '{role}' message.", code="missing_content", param=f"{where}.content"
            )
    elif isinstance(content, str):
        _check_text(content, f"{where}.content")
        if not content.strip() and not (role == "assistant" and has_tool_calls):
            raise invalid(f"'{where}.content' is empty.", code="empty_content", param=f"{where}.content")
    elif isinstance(content, list):
        if not content:
            raise invalid(f"'{where}.content' is an empty array.", code="empty_content", param=f"{where}.content")
        for j, part in enumerate(content):
            p = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"'{p}' must be an object with a 'type'.", code="invalid_type", param=p)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(f"'{p}.text' must be a string.", code="invalid_type", param=f"{p}.text")
                _check_text(part["text"], f"{p}.text")
        if not text_of(content).strip() and all(p["type"] == "text" for p in content):
            raise invalid(f"'{where}.content' is empty.", code="empty_content", param=f"{where}.content")
    else:
        raise invalid(
            f"'{where}.content' must be a string or an array of content parts, got {_type_name(content)}.",
            code="invalid_type",
            param=f"{where}.content",
        )
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise invalid(
            f"'{where}.tool_call_id' is required for a 'tool' message.", code="missing_parameter", param=f"{where}.tool_call_id"
        )
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"'{where}.name' must be a string.", code="invalid_type", param=f"{where}.name")
    return msg


def parse_body(raw: bytes, *, max_messages: int) -> ChatRequest:
    if not raw:
        raise invalid("The request body is empty. Send a JSON object with 'model' and 'messages'.", code="empty_body")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            f"The request body is not valid UTF-8 (bad byte at offset {exc.start}). Encode the body as UTF-8.",
            code="invalid_encoding",
        ) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {_type_name(body)}.", code="invalid_type")

    unknown = sorted(set(body) - HANDLED - set(PASSTHROUGH))
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", code="unknown_parameter", param=unknown[0])

    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise invalid("'model' must be a non-empty string.", code="invalid_type", param="model")

    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required.", code="missing_parameter", param="messages")
    if not isinstance(messages, list):
        raise invalid(f"'messages' must be an array, got {_type_name(messages)}.", code="invalid_type", param="messages")
    if not messages:
        raise invalid("'messages' must contain at least one message.", code="empty_messages", param="messages")
    if len(messages) > max_messages:
        raise invalid(
            f"'messages' has {len(messages)} messages; at most {max_messages} are accepted.",
            code="too_many_messages",
            param="messages",
        )
    for i, msg in enumerate(messages):
        _check_message(i, msg)

    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean.", code="invalid_type", param="stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise invalid("'stream_options' must be an object.", code="invalid_type", param="stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        include_usage = bool(stream_options.get("include_usage", False))

    max_tokens, max_field = None, "max_tokens"
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise invalid(f"'{name}' must be a positive integer.", code="invalid_value", param=name)
        if max_tokens is None:
            max_tokens, max_field = value, name

    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise invalid("'temperature' must be a number between 0 and 2.", code="invalid_value", param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise invalid("'top_p' must be a number between 0 and 1.", code="invalid_value", param="top_p")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("Only 'n': 1 is supported by this gateway.", code="unsupported_value", param="n")
    user = body.get("user", "")
    if user is not None and not isinstance(user, str):
        raise invalid("'user' must be a string.", code="invalid_type", param="user")

    extra = {}
    for name, types in PASSTHROUGH.items():
        if name in body and body[name] is not None:
            if not isinstance(body[name], types) or (types is int and isinstance(body[name], bool)):
                raise invalid(f"'{name}' has the wrong type ({_type_name(body[name])}).", code="invalid_type", param=name)
            extra[name] = body[name]

    return ChatRequest(
        model=model.strip() if model else None,
        messages=messages,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        max_tokens_field=max_field,
        temperature=temperature,
        top_p=top_p,
        user=(user or "")[:128],
        extra=extra,
    )


def too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is {size:,} bytes; the limit is {limit:,} bytes. Shorten the conversation or the pasted text.",
        "request_too_large",
    )
