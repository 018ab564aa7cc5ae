"""session-affinity-filter (the reference's scheduling/filter/sessionaffinity/): the hard
counterpart of session-affinity-scorer. When the session's endpoint is among the
candidates it is the only one kept; with no session, an undecodable token, an unbound
session or a bound endpoint that is no longer a candidate, every candidate is kept (the
filter never empties the set). Strategies and parameters as the scorer's:

- encoded_endpoint_header (default): stateless; the request header
  (encodedEndpointHeaderConfig.header, default x-session-token) carries base64("namespace/name")
  of the endpoint the picker wrote on the previous response (profileName's target when set).
- session_id: the first non-empty of sessionIdConfig.sources (default [{header: x-session-id}])
  is bound to the endpoint picked (profileName's, else the primary profile's); a binding
  moves only when its endpoint was absent from the candidates; bindings unused for
  evictionTtlSeconds (300) are swept every evictionSweepSeconds (10). Nothing is written back.

multicluster-session-affinity-filter is the reference's delegate of this filter (cluster
identity comes from discovery), so it is this class under its own type name."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest
from epp.scheduling.sessionaffinity import SessionAffinityBase, decode_token, endpoint_id


class SessionAffinityFilter(SessionAffinityBase):
    type_name = "session-affinity-filter"

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not endpoints:
            return endpoints
        if self.session_id_strategy:
            sid = self.resolve(cycle, request.headers)
            wanted = self.bindings.get(sid) if sid else None
            if wanted is None:
                return endpoints
            for e in endpoints:
                if endpoint_id(e) == wanted:
                    cycle.write(self._present, True)
                    return [e]
            cycle.write(self._present, False)
            return endpoints
        wanted = decode_token(request.headers.get(self.header))
        if wanted:
            for e in endpoints:
                if endpoint_id(e) == wanted:
                    return [e]
        return endpoints


class MultiClusterSessionAffinityFilter(SessionAffinityFilter):
    type_name = "multicluster-session-affinity-filter"
