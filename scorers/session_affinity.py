"""session-affinity-scorer (the reference's scheduling/scorer/sessionaffinity/ and
scheduling/util/sessionaffinity/): the endpoint a session used before scores 1.0, the
others 0. Two strategies:

- encoded_endpoint_header (default): the client sends back the header
  (encodedEndpointHeaderConfig.header, default x-session-token) = base64("namespace/name") that
  the picker set on the previous response (of profileName's target when set).
- session_id: the session id is the first non-empty of sessionIdConfig.sources, each a request
  header ({header}) or a string a producer published ({attribute, producer}, e.g.
  {attribute: SessionIDDataKey, producer: session-id-producer}); the picker binds it to the
  endpoint picked (profileName's, else the primary profile's) and keeps the binding while that
  endpoint is a candidate (re-bound when it was not); bindings unused for evictionTtlSeconds
  (300) are swept every evictionSweepSeconds (10), here when a request is committed."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest
from epp.scheduling.sessionaffinity import SessionAffinityBase, decode_token, endpoint_id


class SessionAffinityScorer(SessionAffinityBase):
    type_name = "session-affinity-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.session_id_strategy:
            sid = self.session_id(cycle, request)
            bound = self.bindings.get(sid) if sid else None
            if bound is None:
                return [0.0] * len(endpoints)
            out = [1.0 if endpoint_id(e) == bound else 0.0 for e in endpoints]
            cycle.write(self._present, 1.0 in out)
            return out
        wanted = decode_token(request.headers.get(self.header))
        if not wanted:
            return [0.0] * len(endpoints)
        return [1.0 if endpoint_id(e) == wanted else 0.0 for e in endpoints]
