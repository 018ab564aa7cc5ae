"""The plugin contracts: what every extension point hands a plugin, and what it returns.

Modelled on the Kubernetes scheduler framework and the reference picker's
`framework` package: a scheduling cycle runs profiles; each profile runs its filters
in sequence, then its weighted scorers, then its picker. Plugins see only the request,
the candidate endpoints and the per-cycle state; they never reach into the server, the
gRPC stream or the datastore.

Built-in plugins use exactly these contracts. A platform team's plugin is a class with
a `type_name`, a `Params` dataclass (its YAML `parameters`) and one or more of the
extension-point methods below, registered by entry point `epp.plugins` or named as
`module:Class` in the config.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

# Endpoint label keys read by built-in plugins.
ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
ROLE_LABEL = "llm-d.ai/role"
CONTEXT_LENGTH_RANGE_LABEL = "llm-d.ai/context-length-range"


# --------------------------------------------------------------------------- endpoints
@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape of a model server, normalised across engines. Immutable: the scraper
    publishes a new snapshot, readers never see a half-written one."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0  # fraction 0..1, despite the reference's name
    running_lora_adapters: frozenset[str] = frozenset()
    waiting_lora_adapters: frozenset[str] = frozenset()
    max_active_models: int = 0  # vLLM max_lora; 0 = unknown
    block_size: int | None = None  # tokens per KV block, from cache config info
    num_gpu_blocks: int | None = None
    update_time: float = 0.0  # time.monotonic() of the scrape; 0.0 = never scraped
    ok: bool = False  # last scrape succeeded

    def age(self, now: float) -> float:
        return now - self.update_time if self.update_time else float("inf")


@dataclass(eq=False, slots=True)
class Endpoint:
    """One model-server endpoint (a pod's target port). Identity is the object itself:
    the datastore keeps one object per endpoint for its whole life, so plugins may key
    dicts by it. `metrics` is replaced wholesale by the scraper."""

    name: str  # e.g. "<pod>-rank-<i>"; unique in the pool
    address: str  # IP, v4 or v6, no brackets
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    pod_name: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0  # requests this picker routed here and that have not completed
    in_flight_tokens: int = 0  # estimated prompt+output tokens of those requests
    hostport: str = ""  # "ip:port", IPv6 bracketed; derived

    def __post_init__(self) -> None:
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.hostport = f"{host}:{self.port}"
        if not self.pod_name:
            self.pod_name = self.name

    def __repr__(self) -> str:
        return f"Endpoint({self.name} {self.hostport})"


# --------------------------------------------------------------------------- request
@dataclass(slots=True)
class InferenceRequest:
    """A parsed OpenAI request as the scheduler sees it (the reference's LLMRequest)."""

    request_id: str
    target_model: str  # after model rewrite: what the model server is asked for
    incoming_model: str  # what the client asked for
    kind: str  # "completions" | "chat" | "responses" | "embeddings" | "none" (bodiless)
    prompt_text: str  # text used for prefix matching (see reference scheduling.md)
    headers: Mapping[str, str]  # lowercased keys
    body: Mapping[str, Any] | None = None  # parsed JSON body
    stream: bool = False
    objective: str = ""  # InferenceObjective name from x-gateway-inference-objective
    priority: int = 0  # negative = sheddable
    fairness_id: str = "default-flow"
    cache_salt: str = ""
    max_tokens: int | None = None
    size_bytes: int = 0

    @property
    def estimated_prompt_tokens(self) -> int:
        return max(1, len(self.prompt_text) // 4)


# --------------------------------------------------------------------------- cycle
class CycleState(dict[str, Any]):
    """Per-request scratch space shared by the plugins of one scheduling cycle
    (e.g. the prefix matcher stores its match result here for the scorer, the
    affinity filter and the pre-request hook). Keys are namespaced by plugin type."""


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@dataclass(slots=True)
class ProfileRunResult:
    """What a profile's picker chose: primary first, the rest are fallbacks."""

    targets: list[Endpoint]


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileRunResult | None]
    primary_profile: str
    headers: dict[str, str] = field(default_factory=dict)  # headers to set upstream (e.g. x-prefiller-host-port)

    @property
    def targets(self) -> list[Endpoint]:
        r = self.profile_results.get(self.primary_profile)
        return r.targets if r else []


@dataclass(slots=True)
class ResponseInfo:
    """What the response hooks see."""

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    served_endpoint: str = ""  # "ip:port" that actually served (upstream.address)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    end_of_stream: bool = False
    set_headers: dict[str, str] = field(default_factory=dict)  # response headers a plugin wants to add


# --------------------------------------------------------------------------- plugins
@runtime_checkable
class Plugin(Protocol):
    """Every plugin has a registered type name and an instance name (defaults to the type)."""

    type_name: ClassVar[str]
    name: str


@runtime_checkable
class Filter(Plugin, Protocol):
    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


@runtime_checkable
class Scorer(Plugin, Protocol):
    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]:
        """One score in [0, 1] per endpoint, in the order given (clamped by the scheduler)."""
        ...


@runtime_checkable
class Picker(Plugin, Protocol):
    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult: ...


@runtime_checkable
class PrepareData(Plugin, Protocol):
    """Runs once per request before the profiles (e.g. compute prefix matches)."""

    def prepare_request_data(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> None: ...


@runtime_checkable
class PreRequest(Plugin, Protocol):
    """Runs after the pick, before Envoy is told (e.g. record the prefix on the target)."""

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseReceived(Plugin, Protocol):
    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None: ...


@runtime_checkable
class ResponseStreaming(Plugin, Protocol):
    def response_streaming(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None: ...


@runtime_checkable
class ResponseComplete(Plugin, Protocol):
    """Always called once per routed request, also when the client went away (status 0)."""

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None: ...


@runtime_checkable
class EndpointsChanged(Plugin, Protocol):
    """Told when endpoints leave the pool, so indexes can purge them."""

    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class SaturationDetector(Plugin, Protocol):
    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        """Pool saturation: >= 1.0 means saturated."""
        ...


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]  # (scorer, weight)
    picker: Picker


@runtime_checkable
class ProfileHandler(Plugin, Protocol):
    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult | None],
    ) -> Mapping[str, SchedulerProfile]:
        """Profiles to run next; empty when done. Called repeatedly with results so far."""
        ...

    def process_results(
        self, cycle: CycleState, request: InferenceRequest, results: Mapping[str, ProfileRunResult | None]
    ) -> SchedulingResult: ...


# --------------------------------------------------------------------------- handle
@dataclass(slots=True)
class PluginHandle:
    """What a plugin's constructor may use besides its parameters: other plugin
    instances by name (for plugins that compose, e.g. a filter reading a scorer's
    cycle state) and a monotonic clock (virtual in the cluster simulation)."""

    plugins: Mapping[str, Plugin] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    # Randomness for pickers and exploration; seed it for reproducible runs (simulation, tests).
    rng: random.Random = field(default_factory=lambda: random.Random())

    def plugin(self, name: str) -> Plugin:
        return self.plugins[name]


class PluginError(ValueError):
    """A plugin's parameters are wrong; the message names the key."""


def params_from_mapping(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build a plugin's `Params` dataclass from YAML parameters with strict checks:
    unknown keys and wrong types are errors naming `where.key`."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PluginError(f"{where}.{unknown[0]}: unknown parameter (known: {', '.join(sorted(fields)) or 'none'})")
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{where}.{key}")
    try:
        params = cls(**kwargs)
    except TypeError as e:
        raise PluginError(f"{where}: {e}") from None
    check = getattr(params, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise PluginError(f"{where}.{e}") from None
    return params


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except PluginError as e:
                errors.append(str(e))
        raise PluginError(errors[0] if errors else f"{where}: must not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PluginError(f"{where}: expected a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PluginError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise PluginError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise PluginError(f"{where}: expected a string, got {value!r}")
    if origin in (list, Sequence, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise PluginError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict,):
        if not isinstance(value, dict):
            raise PluginError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(hint)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise PluginError(f"{where}: expected a mapping, got {value!r}")
        return params_from_mapping(hint, value, where)
    return value


@dataclass(slots=True)
class NoParams:
    """For plugins that take no parameters."""


__all__ = [
    "CONTEXT_LENGTH_RANGE_LABEL",
    "ENGINE_TYPE_LABEL",
    "ROLE_LABEL",
    "CycleState",
    "Endpoint",
    "EndpointsChanged",
    "Filter",
    "InferenceRequest",
    "Metrics",
    "NoParams",
    "Picker",
    "Plugin",
    "PluginError",
    "PluginHandle",
    "PreRequest",
    "PrepareData",
    "ProfileHandler",
    "ProfileRunResult",
    "ResponseComplete",
    "ResponseInfo",
    "ResponseReceived",
    "ResponseStreaming",
    "SaturationDetector",
    "SchedulerProfile",
    "SchedulingResult",
    "ScoredEndpoint",
    "Scorer",
    "params_from_mapping",
]
