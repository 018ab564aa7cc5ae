"""What every body parser shares: decoding a JSON object, the output budget check and
the token-id check (the reference's MaxOutputTokensFromPayload and GenerateRequest
token_ids rules, with the project's 400 on an invalid budget). Not a plugin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from epp.errors import bad_request
from epp.framework import InferenceRequest

# Largest output budget accepted (vLLM's own limit is the model's context length, far
# below this); anything above, below zero or not an integer is a 400.
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_TOKEN_ID = 2**32 - 1  # token ids are uint32 in the reference's generate requests


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 naming why not."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body is not a JSON object")
    return data


def max_tokens(body: Mapping[str, Any], *keys: str) -> int | None:
    """The output budget the client asked for: the first of `keys` present and not null
    wins; a value that is not an integer from 0 to MAX_TOKENS_LIMIT is a 400."""
    for key in keys:
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


def token_ids(value: Any, key: str) -> list[int]:
    """A non-empty list of uint32 token ids (JSON numbers with no fraction), or a 400."""
    if not isinstance(value, list) or not value:
        raise bad_request(f"invalid generate request: {key} must be a non-empty array of token ids")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKEN_ID:
            raise bad_request(f"invalid generate request: {key}[{i}] is not a token id")
        out.append(v)
    return out


def model_of(body: Mapping[str, Any]) -> str:
    """The body's `model` when it is a string (optional, as in the reference's parsers)."""
    model = body.get("model")
    return model if isinstance(model, str) else ""


def cache_salt_of(body: Mapping[str, Any], key: str = "cache_salt") -> str:
    salt = body.get(key)
    return salt if isinstance(salt, str) else ""


def json_request(request_id: str, body: bytes, data: Mapping[str, Any], kind: str, prompt_text: str,
                 budget: int | None, model: str | None = None) -> InferenceRequest:
    """The request a JSON API body gives: its model (the body's unless given; target = incoming),
    streaming when `stream` is true, its cache_salt, `budget` output tokens, the raw body's size."""
    model = model_of(data) if model is None else model
    return InferenceRequest(request_id=request_id, target_model=model, incoming_model=model, kind=kind,
                            prompt_text=prompt_text, headers={}, body=data, stream=data.get("stream") is True,
                            cache_salt=cache_salt_of(data), max_tokens=budget, size_bytes=len(body))


def dump_bytes(value: Any) -> bytes:
    """JSON of (a part of) the body. orjson reads 1024 levels of nesting but writes 255:
    a deeper one is the client's 400, not the picker's failure."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise bad_request("request body nests too deeply") from None


def dumps(value: Any) -> str:
    """JSON text of a part of the body (dump_bytes, decoded)."""
    return dump_bytes(value).decode()
