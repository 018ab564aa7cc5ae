"""openai-parser: OpenAI request bodies -> InferenceRequest (reference protocol.md,
scheduling.md; llm-d-router's requesthandling/parsers/openai).

The prompt text is what prefix matching hashes: completions `prompt` (a list of strings
joined with spaces), chat the JSON-serialised `messages`, responses and embeddings their
JSON `input`, conversations the JSON `items`, image generations the `prompt`. Bad bodies
are BadRequest (HTTP 400) with a message naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

from epp.errors import bad_request
from epp.framework import InferenceRequest, NamedPlugin
from epp.requestcontrol.parsers.common import dumps, json_object, json_request, max_tokens

# Longest path suffix first: /v1/chat/completions also ends with /completions.
_KIND_BY_PATH = (
    ("/chat/completions/render", "chat"),
    ("/completions/render", "completions"),
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/conversations", "conversations"),
    ("/embeddings", "embeddings"),
    ("/images/generations", "images"),
)
# The output budget's field per API, first wins (the reference's maxOutputTokensForAPI;
# completions also reads max_completion_tokens, as this picker always has).
_MAX_TOKENS_KEYS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
}


KIND_CACHE_SIZE = 256  # paths whose API kind is remembered (a client's paths: least recently used dropped)


@lru_cache(maxsize=KIND_CACHE_SIZE)
def kind_from_path(path: str) -> str:
    """The API an OpenAI path names ("" if none): query string ignored."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, kind in _KIND_BY_PATH:
        if path.endswith(suffix):
            return kind
    return ""


def _kind_from_body(body: Mapping[str, Any]) -> str:
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "responses"
    return ""


def _prompt_text(kind: str, body: Mapping[str, Any]) -> str:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("chat completions request without messages")
        return dumps(messages)
    if kind in ("completions", "images"):
        prompt = body.get("prompt")
        if isinstance(prompt, str) and (prompt or kind == "completions"):
            return prompt
        if kind == "completions" and isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return " ".join(prompt)
            return dumps(prompt)  # token ids: still routable, hashed as JSON
        raise bad_request(f"{'completions' if kind == 'completions' else 'images generations'} request without prompt")
    if kind == "conversations":
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise bad_request("conversations request without items")
        return dumps(items)
    if body.get("input") is None:
        raise bad_request(f"{kind} request without input")
    value = body["input"]
    return value if isinstance(value, str) else dumps(value)


def parse_body(body: bytes, request_id: str, path: str = "") -> InferenceRequest:
    """Parse an OpenAI body (the API from the path, else from the body's fields). An
    empty body (a bodiless request such as GET /v1/models) gives kind "none", model "".
    The control headers are the director's (epp.requestcontrol.headers.apply)."""
    if not body:
        return InferenceRequest(request_id=request_id, target_model="", incoming_model="", kind="none",
                                prompt_text="", headers={})
    data = json_object(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model not found in request body")
    kind = kind_from_path(path) or _kind_from_body(data)
    if not kind:
        raise bad_request("prompt not found in request body (no messages, prompt or input)")
    return json_request(request_id, body, data, kind, _prompt_text(kind, data),
                        max_tokens(data, *_MAX_TOKENS_KEYS.get(kind, ())), model)


class OpenAIParser(NamedPlugin):
    """The OpenAI API: completions, chat completions (and their /render), responses,
    conversations, embeddings, image generations. No parameters."""

    type_name = "openai-parser"
    paths: ClassVar[tuple[str, ...]] = ("chat/completions", "completions", "embeddings", "responses",
                                         "conversations", "chat/completions/render", "completions/render",
                                         "images/generations")

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str, path: str) -> InferenceRequest:
        return parse_body(body, request_id, path)
