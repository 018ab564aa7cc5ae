"""session-affinity-scorer: header `x-session-token` = base64("namespace/name") of the
endpoint that served the session before; that endpoint scores 1.0, the others 0. The
token of the serving endpoint is set on every response so clients can send it back."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest, NamedPlugin, ResponseInfo

SESSION_TOKEN_HEADER = "x-session-token"


def session_token(endpoint: Endpoint) -> str:
    return base64.standard_b64encode(f"{endpoint.namespace}/{endpoint.name}".encode()).decode()


class SessionAffinityScorer(NamedPlugin):
    type_name = "session-affinity-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        token = request.headers.get(SESSION_TOKEN_HEADER)
        if not token:
            return [0.0] * len(endpoints)
        try:
            wanted = base64.standard_b64decode(token.strip()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return [0.0] * len(endpoints)
        return [1.0 if f"{e.namespace}/{e.name}" == wanted else 0.0 for e in endpoints]

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        if target is not None:
            response.set_headers[SESSION_TOKEN_HEADER] = session_token(target)
