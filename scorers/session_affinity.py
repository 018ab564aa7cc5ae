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
    ENCODED_ENDPOINT_HEADER,
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


class SessionAffinityScorer(ConfiguredPlugin[SessionAffinityParams]):
    type_name = "session-affinity-scorer"
    Params = SessionAffinityParams

    def configure(self, p: SessionAffinityParams, handle: PluginHandle) -> None:
        self.strategy = p.strategy
        self.profile = p.profileName
        self.header = normalize_header(p.encodedEndpointHeaderConfig.header, SESSION_TOKEN_HEADER)
        c = p.sessionIdConfig
        self.resolve = SessionIdResolver(c.sources)
        self.bindings = SessionBindings(c.evictionTtlSeconds, c.evictionSweepSeconds, handle.clock)
        self._present: DataKey[bool] = self.own_key("bound-present", bool)
        self._pending: OrderedDict[str, Endpoint] = OrderedDict()  # request id -> profileName's target

    def session_id(self, cycle: CycleState, request: InferenceRequest) -> str:
        return self.resolve(cycle, request.headers)

    # ------------------------------------------------------------------ extension points
    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.strategy == SESSION_ID:
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

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.strategy != SESSION_ID:
            if self.profile:  # the response header names this profile's target
                target = picked(result, self.profile)
                if target is not None:
                    self._pending[request.request_id] = target
                    while len(self._pending) > MAX_PENDING:
                        self._pending.popitem(last=False)
            return
        sid = self.session_id(cycle, request)
        target = picked(result, self.profile)
        if sid and target is not None:
            # keeps a binding whose endpoint was a candidate but lost to other scorers; re-binds otherwise
            self.bindings.commit(sid, endpoint_id(target), cycle.read(self._present))

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        if self.strategy != ENCODED_ENDPOINT_HEADER:
            return
        if self.profile:
            target = self._pending.pop(request.request_id, None)
        if target is not None:
            response.set_headers[self.header] = session_token(target)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        self._pending.pop(request.request_id, None)
