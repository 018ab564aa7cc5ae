"""OpenAI request body -> InferenceRequest (reference protocol.md, scheduling.md).

The prompt text is what prefix matching hashes: completions `prompt` (a list of strings
joined with spaces), chat the JSON-serialised `messages`, responses and embeddings their
JSON `input`. Bad bodies are BadRequest (HTTP 400) with a message naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from epp.errors import bad_request
from epp.framework import InferenceRequest

FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
DEFAULT_FAIRNESS_ID = "default-flow"
# Largest output budget accepted (vLLM's own limit is the model's context length, far
# below this); anything above, below zero or not an integer is a 400.
MAX_TOKENS_LIMIT = 2**31 - 1
_MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens")

# Longest path suffix first: /v1/chat/completions also ends with /completions.
_KIND_BY_PATH = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)


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
        return orjson.dumps(messages).decode()
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return " ".join(prompt)
        if isinstance(prompt, list) and prompt:  # token ids: still routable, hashed as JSON
            return orjson.dumps(prompt).decode()
        raise bad_request("completions request without prompt")
    if "input" not in body:
        raise bad_request(f"{kind} request without input")
    value = body["input"]
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """The output budget the client asked for (max_completion_tokens wins), validated."""
    for key in _MAX_TOKENS_KEYS:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():  # JSON 100.0: an integer, as vLLM reads it
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_LIMIT:
            shown = repr(value) if isinstance(value, (int, float)) else type(value).__name__
            raise bad_request(f"{key} must be an integer from 0 to {MAX_TOKENS_LIMIT}, got {shown[:32]}")
        return value
    return None


def parse_request(body: bytes, headers: Mapping[str, str], request_id: str, path: str = "") -> InferenceRequest:
    """Parse an OpenAI body. `headers` has lowercased keys. An empty body (a bodiless
    request such as GET /v1/models) gives kind "none" and model ""."""
    fairness = headers.get(FAIRNESS_HEADER) or DEFAULT_FAIRNESS_ID
    objective = headers.get(OBJECTIVE_HEADER, "")
    if not body:
        return InferenceRequest(request_id=request_id, target_model="", incoming_model="", kind="none",
                                prompt_text="", headers=headers, objective=objective, fairness_id=fairness)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body is not a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model not found in request body")
    kind = kind_from_path(path) or _kind_from_body(data)
    if not kind:
        raise bad_request("prompt not found in request body (no messages, prompt or input)")
    salt = data.get("cache_salt")
    return InferenceRequest(
        request_id=request_id,
        target_model=model,
        incoming_model=model,
        kind=kind,
        prompt_text=_prompt_text(kind, data),
        headers=headers,
        body=data,
        stream=data.get("stream") is True,
        objective=objective,
        fairness_id=fairness,
        cache_salt=salt if isinstance(salt, str) else "",
        max_tokens=_max_tokens(data),
        size_bytes=len(body),
    )


def rewritten_body(request: InferenceRequest) -> bytes:
    """The body with `model` set to the request's target model (after a rewrite)."""
    data = dict(request.body or {})
    data["model"] = request.target_model
    return orjson.dumps(data)
