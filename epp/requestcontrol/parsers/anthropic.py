"""anthropic-parser: the Anthropic Messages API (/v1/messages, /v1/messages/count_tokens),
as llm-d-router's requesthandling/parsers/anthropic parses it.

/v1/messages needs a JSON object with at least one message; `system` and each message's
`content` are a string or an array of content blocks. The prompt text prefix matching
hashes is the reference's flattening of the conversation (its estimate tokenizer's byte
stream): the tools as JSON, the system text, then per message its role and the text of
its blocks (text, thinking, tool_use id+name+input, tool_result content). `model`,
`max_tokens`, `stream` and `cache_salt` are read; `model` is optional, as in the
reference. count_tokens bodies are routed unparsed (the reference forwards them as is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from epp.errors import bad_request
from epp.framework import InferenceRequest, NamedPlugin
from epp.requestcontrol.parsers.common import (
    dumps,
    json_object,
    json_request,
    max_tokens,
)

MESSAGES_PATH = "messages"
COUNT_TOKENS_PATH = "messages/count_tokens"
MAX_CONTENT_DEPTH = 8  # tool_result blocks nest content; deeper nesting is refused


def _text_of(block: Mapping[str, Any], field: str) -> str:
    value = block.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(f"invalid messages request: {field} must be a string")
    return value


def _content_text(content: Any, out: list[str], depth: int = 0) -> None:
    """Append the text of a content field (a string or an array of blocks) to `out`."""
    if content is None:
        return
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list) or depth > MAX_CONTENT_DEPTH:
        raise bad_request("invalid messages request: content must be a string or an array of content blocks")
    for block in content:
        if not isinstance(block, dict):
            raise bad_request("invalid messages request: a content block must be an object")
        kind = _text_of(block, "type")
        if kind == "text":
            out.append(_text_of(block, "text"))
        elif kind == "thinking":
            out.append(_text_of(block, "thinking"))
        elif kind == "tool_use":
            out.append(_text_of(block, "id"))
            out.append(_text_of(block, "name"))
            if block.get("input") is not None:
                out.append(dumps(block["input"]))
        elif kind == "tool_result":
            _content_text(block.get("content"), out, depth + 1)


def prompt_text(data: Mapping[str, Any]) -> str:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("invalid messages request: must have at least one message")
    out: list[str] = []
    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("invalid messages request: tools must be an array")
        if tools:
            out.append(dumps(tools))
    _content_text(data.get("system"), out)
    for message in messages:
        if not isinstance(message, dict):
            raise bad_request("invalid messages request: a message must be an object")
        out.append(_text_of(message, "role"))
        _content_text(message.get("content"), out)
    return "".join(out)


class AnthropicParser(NamedPlugin):
    """The Anthropic Messages API. No parameters."""

    type_name = "anthropic-parser"
    paths: ClassVar[tuple[str, ...]] = (MESSAGES_PATH, COUNT_TOKENS_PATH)

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str, path: str) -> InferenceRequest:
        path = path.split("?", 1)[0]
        if path.endswith("/" + COUNT_TOKENS_PATH):
            return InferenceRequest(request_id=request_id, target_model="", incoming_model="", kind="count_tokens",
                                    prompt_text="", headers={}, size_bytes=len(body))
        if not path.endswith("/" + MESSAGES_PATH):
            raise bad_request(f"unsupported API endpoint: {path[:128]}")
        data = json_object(body)
        return json_request(request_id, body, data, "messages", prompt_text(data), max_tokens(data, "max_tokens"))
