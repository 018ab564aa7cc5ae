"""Session-affinity helpers shared by the session-affinity plugins (the reference's
scheduling/util/sessionaffinity/): the parameters both strategies take, the
encoded-endpoint token, session-id resolution from headers or a producer's string
attribute, and the bounded, TTL-evicted session -> endpoint binding store. Pure data
structures: no I/O, time from the caller's clock."""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from epp.framework.datakeys import DataKey
from epp.framework.headers import SESSION_ID as SESSION_ID_HEADER  # sessionIdConfig.sources default
from epp.framework.plugins import ConfiguredPlugin, PluginHandle
from epp.framework.types import CycleState, Endpoint, InferenceRequest, ResponseInfo, SchedulingResult

SESSION_TOKEN_HEADER = "x-session-token"  # encodedEndpointHeaderConfig.header default
ENCODED_ENDPOINT_HEADER, SESSION_ID = "encoded_endpoint_header", "session_id"
DEFAULT_TTL_SECONDS = 300.0  # sessionIdConfig.evictionTtlSeconds
DEFAULT_SWEEP_SECONDS = 10.0  # sessionIdConfig.evictionSweepSeconds
MAX_SESSIONS = 1 << 16  # bindings kept at once; past it the least recently used goes
MAX_TOKEN_CHARS = 4096  # a session token longer than this is not decoded (no preference)
MAX_SESSION_ID_CHARS = 4096  # a session id longer than this is ignored (no preference)


def endpoint_id(endpoint: Endpoint) -> str:
    """The reference's endpoint ID string: namespace/name."""
    return f"{endpoint.namespace}/{endpoint.name}"


def session_token(endpoint: Endpoint) -> str:
    return base64.standard_b64encode(endpoint_id(endpoint).encode()).decode()


def decode_token(token: str | None) -> str:
    """The endpoint ID a session token names, or "" when absent or undecodable."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return ""
    try:
        return base64.standard_b64decode(token.strip()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


def normalize_header(name: str, default: str) -> str:
    return name.strip().lower() or default


@dataclass(slots=True)
class EncodedEndpointHeaderConfig:
    header: str = ""  # "": x-session-token


@dataclass(slots=True)
class SessionIdSource:
    header: str = ""
    attribute: str = ""
    producer: str = ""


@dataclass(slots=True)
class SessionIdConfig:
    sources: list[SessionIdSource] = field(default_factory=list)  # []: [{header: x-session-id}]
    evictionTtlSeconds: float = 0.0  # 0: 300
    evictionSweepSeconds: float = 0.0  # 0: 10


@dataclass(slots=True)
class SessionAffinityParams:
    """The parameters of session-affinity-scorer and session-affinity-filter."""

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
            value = getattr(c, key)
            if value < 0 or value != value:
                raise ValueError(f"sessionIdConfig.{key}: must be > 0, got {value}")


class SessionIdResolver:
    """The session id of a request: the first non-empty of the configured sources, each a
    request header or a string a producer published in the cycle state."""

    __slots__ = ("sources",)

    def __init__(self, sources: list[SessionIdSource]) -> None:
        srcs = sources or [SessionIdSource(header=SESSION_ID_HEADER)]
        # (header, None) or (None, the cycle key: attribute/producer, or the attribute alone)
        self.sources: list[tuple[str | None, str | None]] = [
            (normalize_header(s.header, SESSION_ID_HEADER), None) if s.header
            else (None, str(DataKey(s.attribute, str).of(s.producer)) if s.producer else s.attribute)
            for s in srcs]

    def __call__(self, cycle: CycleState, headers: Mapping[str, str]) -> str:
        for header, key in self.sources:
            value = headers.get(header, "") if header is not None else cycle.get(key)
            if isinstance(value, str) and len(value) <= MAX_SESSION_ID_CHARS:
                value = value.strip()
                if value:
                    return value
        return ""


def picked(result: SchedulingResult, profile: str) -> Endpoint | None:
    """The first target of `profile`'s result (the primary profile's when empty)."""
    r = result.profile_results.get(profile or result.primary_profile)
    return r.targets[0] if r is not None and r.targets else None


class SessionBindings:
    """session id -> (endpoint ID, last used), bounded by MAX_SESSIONS (least recently used
    evicted). Bindings unused for `ttl` seconds are swept at most every `sweep_every`
    seconds, when a binding is committed; expiry is not checked on read (as the reference's
    sweeper)."""

    def __init__(self, ttl: float, sweep_every: float, clock: Callable[[], float], bound: int = MAX_SESSIONS) -> None:
        self.ttl = ttl or DEFAULT_TTL_SECONDS
        self.sweep_every = sweep_every or DEFAULT_SWEEP_SECONDS
        self.clock = clock
        self.bound = bound
        self._last_sweep = clock()
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[str]:
        """The bound session ids, least recently used first."""
        return iter(self._map)

    def get(self, session: str) -> str | None:
        b = self._map.get(session)
        return b[0] if b is not None else None

    def sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_every:
            return
        self._last_sweep = now
        for sid in [sid for sid, (_, seen) in self._map.items() if now - seen > self.ttl]:
            del self._map[sid]

    def commit(self, session: str, endpoint: str, present: bool | None) -> None:
        """Record that `session` was routed to `endpoint`. An existing binding to another
        endpoint moves only when its endpoint was confirmed absent from the candidates
        (`present` False); None (not recorded) never forces a move."""
        now = self.clock()
        self.sweep(now)
        old = self._map.get(session)
        if old is not None and old[0] != endpoint and present is not False:
            return
        self._map[session] = (endpoint, now)
        self._map.move_to_end(session)
        while len(self._map) > self.bound:
            self._map.popitem(last=False)


MAX_PENDING = 1 << 16  # requests between PreRequest and their response headers (profileName)


class SessionAffinityBase(ConfiguredPlugin[SessionAffinityParams]):
    """What session-affinity-scorer and session-affinity-filter share: their state from
    SessionAffinityParams, the session-id binding at PreRequest and the encoded-endpoint
    header written on the response. A subclass adds its Scorer or Filter step, which
    writes `_present` (whether the bound endpoint was a candidate) in session_id mode."""

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

    def session_id(self, cycle: CycleState, request: InferenceRequest) -> str:
        return self.resolve(cycle, request.headers)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self.session_id_strategy:
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
            # keeps a binding whose endpoint was a candidate but lost; re-binds otherwise
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
