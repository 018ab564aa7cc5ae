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

from collections import OrderedDict
from collections.abc import Sequence

from epp.framework import (
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ResponseInfo,
    SchedulingResult,
)
from epp.framework.plugins import ConfiguredPlugin
from epp.framework.sessionaffinity import (
    SESSION_ID,
    SESSION_TOKEN_HEADER,
    SessionAffinityParams,
    SessionBindings,
    SessionIdResolver,
    decode_token,
    endpoint_id,
    normalize_header,
    picked,
    session_token,
)

MAX_PENDING = 1 << 16  # requests between PreRequest and their response headers (profileName)


class SessionAffinityFilter(ConfiguredPlugin[SessionAffinityParams]):
    type_name = "session-affinity-filter"
    Params = SessionAffinityParams

    def configure(self, p: SessionAffinityParams, handle: PluginHandle) -> None:
        self.session_id_strategy = p.strategy == SESSION_ID
        self.profile = p.profileName
        self.header = normalize_header(p.encodedEndpointHeaderConfig.header, SESSION_TOKEN_HEADER)
        c = p.sessionIdConfig
        self.resolve = SessionIdResolver(c.sources)
        self.bindings = SessionBindings(c.evictionTtlSeconds, c.evictionSweepSeconds, handle.clock)
        self._present: DataKey[bool] = self.own_key("bound-present", bool)
        self._pending: OrderedDict[str, Endpoint] = OrderedDict()  # request id -> profileName's target

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

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self.session_id_strategy:
            if self.profile:  # the response header names this profile's target
                target = picked(result, self.profile)
                if target is not None:
                    self._pending[request.request_id] = target
                    while len(self._pending) > MAX_PENDING:
                        self._pending.popitem(last=False)
            return
        sid = self.resolve(cycle, request.headers)
        target = picked(result, self.profile)
        if sid and target is not None:
            self.bindings.commit(sid, endpoint_id(target), cycle.read(self._present))

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        if self.session_id_strategy:
            return
        if self.profile:  # None when that profile was not scheduled (e.g. decode-only)
            target = self._pending.pop(request.request_id, None)
        if target is not None:
            response.set_headers[self.header] = session_token(target)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        self._pending.pop(request.request_id, None)


class MultiClusterSessionAffinityFilter(SessionAffinityFilter):
    type_name = "multicluster-session-affinity-filter"
