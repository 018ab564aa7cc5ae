"""The encode stage of E/P/D disaggregation (reference pkg/sidecar/proxy/connector_ec_common.go,
connector_ec_nixl.go), in the simulator's own terms.

The decode side's routing sidecar, given `x-encoder-hosts-ports` (a comma list) on a chat
request with multimodal parts, sends one encoder request per part (URL parts deduplicated)
to the encoders in turn: a copy of the request whose only message is that part, one output
token, not streamed. Each encoder answers with `ec_transfer_params` (where its encoder cache
entry can be fetched); the sidecar merges them into the request's `ec_transfer_params` and
goes on with prefill/decode. An encoder that fails fails the request (502), as there.

An `--role encode` server runs each request it gets as an encoder pass (counted as role
"encode") and answers with its entry per multimodal part. Multimodal parts are not
tokenized here: each stands in the prompt as a short placeholder text.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from epp.httpbody import read_bounded

ENCODERS_HEADER = "x-encoder-hosts-ports"
MM_TYPES = frozenset({"image_url", "audio_url", "video_url", "input_audio"})  # the sidecar's mmTypes
MAX_ITEMS = 64  # multimodal parts fanned out per request; beyond, the request is refused (400)
MAX_ENCODERS = 64  # encoder host:ports read from the header
ENCODER_RESPONSE_LIMIT = 1 << 20  # bytes read from an encoder's answer


class EncoderError(Exception):
    """An encoder request failed; the sidecar answers 502."""


def mm_items(body: Mapping[str, Any]) -> list[dict]:
    """The request's multimodal content parts in order, URL parts deduplicated."""
    items: list[dict] = []
    seen: set[str] = set()
    messages = body.get("messages")
    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, Mapping) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping) or part.get("type") not in MM_TYPES:
                continue
            url = _url(part)
            if url:
                if url in seen:
                    continue
                seen.add(url)
            items.append(dict(part))
    return items


def _url(part: Mapping[str, Any]) -> str:
    inner = part.get(part.get("type", ""))
    url = inner.get("url") if isinstance(inner, Mapping) else None
    return url if isinstance(url, str) else ""


def item_hash(part: Mapping[str, Any]) -> str:
    """A stable id of a multimodal part (vLLM keys its encoder cache by the item's hash)."""
    return hashlib.sha256(orjson.dumps(part, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def placeholder_messages(messages: list) -> list:
    """`messages` with each multimodal part replaced by a text placeholder, for tokenizing."""
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") in MM_TYPES for p in content):
            parts = [{"type": "text", "text": f"<{p['type']}>"} if isinstance(p, Mapping) and p.get("type") in MM_TYPES
                     else p for p in content]
            msg = {**msg, "content": parts}
        out.append(msg)
    return out


def encoder_targets(values: Sequence[str]) -> list[str]:
    """The encoders named by the header's values (one comma list, or several values)."""
    if len(values) == 1:
        values = values[0].split(",")
    return [v.strip() for v in values if v.strip()][:MAX_ENCODERS]


def encoder_request(body: Mapping[str, Any], part: Mapping[str, Any]) -> dict:
    """The per-part request: the original with only this part, one token, not streamed."""
    out = dict(body)
    out["messages"] = [{"role": "user", "content": [dict(part)]}]
    out["max_tokens"] = 1
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out.pop("ec_transfer_params", None)
    return out


def encoder_answer(host: str, port: int, engine_id: str, body: Mapping[str, Any]) -> dict:
    """What an encoder returns in `ec_transfer_params`: its cache entry per multimodal part."""
    return {item_hash(p): {"peer_host": host, "peer_port": port, "engine_id": engine_id} for p in mm_items(body)}


async def fan_out(session: aiohttp.ClientSession, body: Mapping[str, Any], encoders: Sequence[str],
                  request_id: str, timeout: float) -> dict:
    """Send each multimodal part to an encoder (round robin), in parallel; the merged
    ec_transfer_params ({} when no answer carried any). Raises EncoderError."""
    items = mm_items(body)
    if len(items) > MAX_ITEMS:
        raise ValueError(f"too many multimodal parts ({len(items)} > {MAX_ITEMS})")

    async def one(i: int, part: dict) -> dict:
        target = encoders[i % len(encoders)]
        url = f"http://{target}/v1/chat/completions"
        headers = {"Content-Type": "application/json", "x-request-id": f"{request_id}-enc-{i}"}
        try:
            async with session.post(url, data=orjson.dumps(encoder_request(body, part)), headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                raw = await read_bounded(r.content, ENCODER_RESPONSE_LIMIT)
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise EncoderError(f"encoder request failed for item {i} at {target}: {e!r}") from None
        if status >= 400 or raw is None:
            raise EncoderError(f"encoder request failed for item {i} with status {status}")
        try:
            params = orjson.loads(raw).get("ec_transfer_params")
        except (orjson.JSONDecodeError, AttributeError):
            raise EncoderError(f"failed to parse encoder response for item {i}") from None
        return params if isinstance(params, dict) else {}

    merged: dict = {}
    for params in await asyncio.gather(*(one(i, part) for i, part in enumerate(items))):
        merged.update(params)
    return merged
