"""sglanghttp-parser: SGLang's native HTTP /generate, outside the OpenAI surface, as
llm-d-router's requesthandling/parsers/sglanghttp parses it.

Only pre-tokenized prompts: `input_ids` (required, one non-empty array of uint32s; a
batch is refused as in the reference), `extra_key` (a string: the cache salt),
`sampling_params.max_new_tokens` (read when a non-negative integer, else ignored),
`stream` (a boolean). The path must be exactly /generate. The body is forwarded as
received: no model is read from it and a model rewrite does not touch it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from epp.errors import bad_request
from epp.framework import InferenceRequest, NamedPlugin
from epp.requestcontrol.parsers.common import MAX_TOKENS_LIMIT, dumps, json_object, token_ids

GENERATE_PATH = "generate"


def _max_new_tokens(sampling: object) -> int | None:
    if not isinstance(sampling, dict):
        return None
    value = sampling.get("max_new_tokens")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_LIMIT:
        return None
    return value


class SGLangHTTPParser(NamedPlugin):
    type_name = "sglanghttp-parser"
    paths: ClassVar[tuple[str, ...]] = (GENERATE_PATH,)

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str, path: str) -> InferenceRequest:
        path = path.split("?", 1)[0].strip().rstrip("/")
        if path not in (GENERATE_PATH, "/" + GENERATE_PATH):
            raise bad_request(f"unsupported path: {path[:128]}")
        data = json_object(body)
        if data.get("input_ids") is None:
            raise bad_request("invalid generate request: input_ids must be provided")
        salt = data.get("extra_key")
        if salt is not None and not isinstance(salt, str):
            raise bad_request("unsupported generate request: extra_key must be a string")
        ids = token_ids(data["input_ids"], "input_ids")
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("invalid generate request: stream must be a boolean")
        return InferenceRequest(
            request_id=request_id,
            target_model="",
            incoming_model="",
            kind="generate",
            prompt_text=dumps(ids),
            headers={},
            stream=stream is True,
            cache_salt=salt or "",
            max_tokens=_max_new_tokens(data.get("sampling_params")),
            size_bytes=len(body),
        )
