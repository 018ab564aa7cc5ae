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

import base64
import binascii
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

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

SESSION_TOKEN_HEADER = "x-session-token"
SESSION_ID_HEADER = "x-session-id"
ENCODED_ENDPOINT_HEADER, SESSION_ID = "encoded_endpoint_header", "session_id"
MAX_SESSIONS = 1 << 16  # bindings kept at once; past it the least recently used goes
MAX_PENDING = 1 << 16  # requests between PreRequest and their response headers (profileName)


def endpoint_id(endpoint: Endpoint) -> str:
    return f"{endpoint.namespace}/{endpoint.name}"


def session_token(endpoint: Endpoint) -> str:
    return base64.standard_b64encode(endpoint_id(endpoint).encode()).decode()


def normalize_header(name: str, default: str) -> str:
    return name.strip().lower() or default


@dataclass(slots=True)
class EncodedEndpointHeaderConfig:
    header: str = ""


@dataclass(slots=True)
class SessionIdSource:
    header: str = ""
    attribute: str = ""
    producer: str = ""


@dataclass(slots=True)
class SessionIdConfig:
    sources: list[SessionIdSource] = field(default_factory=list)
    evictionTtlSeconds: float = 0.0  # 0: 300
    evictionSweepSeconds: float = 0.0  # 0: 10


@dataclass(slots=True)
class SessionAffinityParams:
    strategy: str = ENCODED_ENDPOINT_HEADER
    encodedEndpointHeaderConfig: EncodedEndpointHeaderConfig = field(default_factory=EncodedEndpointHeaderConfig)
    sessionIdConfig: SessionIdConfig = field(default_factory=SessionIdConfig)
    profileName: str = ""

    def validate(self) -> None:
        if self.strategy == ENCODED_ENDPOINT_HEADER:
            return
        if self.strategy != SESSION_ID:
            raise ValueError(f"strategy: must be {ENCODED_ENDPOINT_HEADER!r} or {SESSION_ID!r}, got {self.strategy!r}")
        c = self.sessionIdConfig
        for i, s in enumerate(c.sources):
            if (s.header == "") == (s.attribute == ""):
                raise ValueError(f"sessionIdConfig.sources[{i}]: exactly one of header or attribute must be set")
        for key in ("evictionTtlSeconds", "evictionSweepSeconds"):
            if getattr(c, key) < 0:
                raise ValueError(f"sessionIdConfig.{key}: must be > 0, got {getattr(c, key)}")


class SessionAffinityScorer(ConfiguredPlugin[SessionAffinityParams]):
    type_name = "session-affinity-scorer"
    Params = SessionAffinityParams

    def configure(self, p: SessionAffinityParams, handle: PluginHandle) -> None:
        self.strategy = p.strategy
        self.profile = p.profileName
        self.clock = handle.clock
        self.header = normalize_header(p.encodedEndpointHeaderConfig.header, SESSION_TOKEN_HEADER)
        c = p.sessionIdConfig
        sources = c.sources or [SessionIdSource(header=SESSION_ID_HEADER)]
        # (header, None) or (None, the producer's cycle key)
        self.sources: list[tuple[str | None, str | None]] = [
            (normalize_header(s.header, SESSION_TOKEN_HEADER), None) if s.header
            else (None, str(DataKey(s.attribute, str).of(s.producer))) for s in sources]
        self.ttl = c.evictionTtlSeconds or 300.0
        self.sweep_every = c.evictionSweepSeconds or 10.0
        self._last_sweep = self.clock()
        self.bindings: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session -> (endpoint id, last seen)
        self._present: DataKey[bool] = self.own_key("bound-present", bool)
        self._pending: OrderedDict[str, Endpoint] = OrderedDict()  # request id -> profileName's target

    # ------------------------------------------------------------------ session_id
    def session_id(self, cycle: CycleState, request: InferenceRequest) -> str:
        for header, key in self.sources:
            value = request.headers.get(header, "") if header is not None else cycle.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return ""

    def _picked(self, result: SchedulingResult) -> Endpoint | None:
        r = result.profile_results.get(self.profile or result.primary_profile)
        return r.targets[0] if r is not None and r.targets else None

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_every:
            return
        self._last_sweep = now
        expired = [sid for sid, (_, seen) in self.bindings.items() if now - seen > self.ttl]
        for sid in expired:
            del self.bindings[sid]

    # ------------------------------------------------------------------ extension points
    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.strategy == SESSION_ID:
            sid = self.session_id(cycle, request)
            bound = self.bindings.get(sid) if sid else None
            if bound is None:
                return [0.0] * len(endpoints)
            out = [1.0 if endpoint_id(e) == bound[0] else 0.0 for e in endpoints]
            cycle.write(self._present, 1.0 in out)
            return out
        token = request.headers.get(self.header)
        if not token:
            return [0.0] * len(endpoints)
        try:
            wanted = base64.standard_b64decode(token.strip()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return [0.0] * len(endpoints)
        return [1.0 if endpoint_id(e) == wanted else 0.0 for e in endpoints]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.strategy != SESSION_ID:
            if self.profile:  # the response header names this profile's target
                target = self._picked(result)
                if target is not None:
                    self._pending[request.request_id] = target
                    while len(self._pending) > MAX_PENDING:
                        self._pending.popitem(last=False)
            return
        now = self.clock()
        self._sweep(now)
        sid = self.session_id(cycle, request)
        picked = self._picked(result)
        if not sid or picked is None:
            return
        new = endpoint_id(picked)
        old = self.bindings.get(sid)
        # keep a binding whose endpoint was a candidate but lost to other scorers; re-bind otherwise
        if old is not None and old[0] != new and cycle.read(self._present) is not False:
            return
        self.bindings[sid] = (new, now)
        self.bindings.move_to_end(sid)
        while len(self.bindings) > MAX_SESSIONS:
            self.bindings.popitem(last=False)

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        if self.strategy != ENCODED_ENDPOINT_HEADER:
            return
        if self.profile:
            target = self._pending.pop(request.request_id, None)
        if target is not None:
            response.set_headers[self.header] = session_token(target)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        self._pending.pop(request.request_id, None)
