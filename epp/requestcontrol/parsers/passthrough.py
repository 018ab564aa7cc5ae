"""passthrough-parser: any body, routed without interpretation (llm-d-router's
requesthandling/parsers/passthrough). It claims no path, so it is the fallback for
paths no other parser claims and belongs last in the list. The request has no model and
no prompt: payload-derived scorers (prefix cache) have nothing to match, load-based ones
decide; the body is forwarded as received."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from epp.framework import InferenceRequest, NamedPlugin


class PassthroughParser(NamedPlugin):
    type_name = "passthrough-parser"
    paths: ClassVar[tuple[str, ...]] = ()

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str, path: str) -> InferenceRequest:
        return InferenceRequest(request_id=request_id, target_model="", incoming_model="", kind="passthrough",
                                prompt_text="", headers={}, size_bytes=len(body))
