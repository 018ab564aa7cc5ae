"""vllmhttp-parser: vLLM's own HTTP generate API (/inference/v1/generate), outside the
OpenAI surface, as llm-d-router's requesthandling/parsers/vllmhttp parses it.

The body is a JSON object with pre-tokenized `token_ids` (required, non-empty uint32s);
`model`, `sampling_params.max_tokens`, `stream` and `cache_salt` are read. Prefix
matching hashes the token ids (as JSON, like token-id completions prompts). The body keeps
its `model` key, so a model rewrite applies to it. Only this path is claimed: list
openai-parser too to serve OpenAI paths on the same route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from epp.errors import bad_request
from epp.framework import InferenceRequest, NamedPlugin
from epp.requestcontrol.parsers.common import (
    dumps,
    json_object,
    json_request,
    max_tokens,
    token_ids,
)

GENERATE_PATH = "inference/v1/generate"


class VllmHTTPParser(NamedPlugin):
    type_name = "vllmhttp-parser"
    paths: ClassVar[tuple[str, ...]] = (GENERATE_PATH,)

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str, path: str) -> InferenceRequest:
        path = path.split("?", 1)[0]
        if not path.endswith(GENERATE_PATH):
            raise bad_request(f"unsupported path: {path[:128]}")
        data = json_object(body)
        ids = token_ids(data.get("token_ids"), "token_ids")
        sampling = data.get("sampling_params")
        return json_request(request_id, body, data, "generate", dumps(ids),
                            max_tokens(sampling, "max_tokens") if isinstance(sampling, dict) else None)
