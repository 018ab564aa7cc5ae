"""The deciders disagg-profile-handler asks, once the decode endpoint is picked, whether
a stage runs apart: prefill on a prefill endpoint (P/D), encoding on encoder endpoints
(E/PD). Reference: pkg/epp/framework/plugins/scheduling/profilehandler/disagg/
{prefix_based_pd_decider,always_disagg_pd_decider,always_disagg_mm_decider}.go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.framework import CycleState, Endpoint, InferenceRequest, NamedPlugin, PluginHandle, bounded
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    PREFIX_MATCH_CONSUMER,
    PREFIX_MATCH_INFO,
    TOKENIZED_PROMPT,
    TOKENS_CONSUMER,
)


@dataclass(slots=True)
class PrefixDeciderParams:
    nonCachedTokens: int = bounded(0, ge=0)  # 0 = never disaggregate
    promptTokens: int = bounded(0, ge=0)  # a minimum prompt length first; 0 = no such gate
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName


class PrefixBasedPDDecider:
    """prefix-based-pd-decider (reference prefix_based_pd_decider.go): with P = the prompt's
    tokens (the token producer's count) and C = the tokens of the prefix the decode
    endpoint holds (its cached blocks x block size), disaggregate iff nonCachedTokens > 0,
    P >= promptTokens (when > 0), P >= nonCachedTokens and P - C >= nonCachedTokens: a
    long prompt mostly cached on the decode endpoint is cheaper to prefill there."""

    type_name = "prefix-based-pd-decider"
    Params = PrefixDeciderParams
    consumes = (TOKENS_CONSUMER, PREFIX_MATCH_CONSUMER)

    def __init__(self, name: str, params: PrefixDeciderParams | None, handle: PluginHandle) -> None:
        p = params or PrefixDeciderParams()
        self.name = name
        self.non_cached_tokens = p.nonCachedTokens
        self.prompt_tokens = p.promptTokens
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName)

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint | None) -> bool:
        n = self.non_cached_tokens
        if n == 0 or decode_endpoint is None:
            return False
        tokens = cycle.read(TOKENIZED_PROMPT) or 0
        if tokens < self.prompt_tokens or tokens < n:
            return False
        match = cycle.read(self._key)
        if match is None:  # the reference: no prefix state, no disaggregation
            return False
        return tokens - match.cached_tokens(decode_endpoint) >= n


class AlwaysDisaggPDDecider(NamedPlugin):
    """always-disagg-pd-decider: every request is prefilled apart."""

    type_name = "always-disagg-pd-decider"

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint | None) -> bool:
        return True


# Content-part types that carry an image, audio or video (OpenAI chat/responses, Anthropic messages).
MULTIMODAL_PART_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "audio_url",
                                   "video_url", "video", "input_video"})
MAX_MESSAGES_SCANNED = 1024  # bound on the messages (and parts per message) looked at per request


def has_multimodal_content(body: Mapping[str, Any] | None) -> bool:
    """Whether the request's messages (chat, messages) or input items (responses) carry an
    image, audio or video content part. The reference asks its tokenizer for multimodal
    features; the parts the tokenizer would find are read from the body here."""
    if not isinstance(body, Mapping):
        return False
    for key in ("messages", "input"):
        items = body.get(key)
        if not isinstance(items, list):
            continue
        for item in items[:MAX_MESSAGES_SCANNED]:
            parts = item.get("content") if isinstance(item, Mapping) else None
            if isinstance(item, Mapping) and item.get("type") in MULTIMODAL_PART_TYPES:
                return True
            if not isinstance(parts, list):
                continue
            for part in parts[:MAX_MESSAGES_SCANNED]:
                if isinstance(part, Mapping) and part.get("type") in MULTIMODAL_PART_TYPES:
                    return True
    return False


class AlwaysDisaggMultimodalDecider(NamedPlugin):
    """always-disagg-multimodal-decider: encoding runs apart iff the request has
    multimodal content (reference always_disagg_mm_decider.go)."""

    type_name = "always-disagg-multimodal-decider"

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint | None) -> bool:
        return has_multimodal_content(request.body)
