"""Extension-point protocols and the handle a plugin is constructed with."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from epp.framework.datakeys import DataKey, ProducerParam
from epp.framework.metrics import PluginMetrics
from epp.framework.types import (
    CycleState,
    Endpoint,
    InferenceRequest,
    ProfileRunResult,
    ResponseInfo,
    SchedulingResult,
    ScoredEndpoint,
)

T = TypeVar("T")


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


@runtime_checkable
class PDDecider(Plugin, Protocol):
    """Asked by a prefill/decode profile handler, once the decode endpoint is picked,
    whether the request's prefill should run on a separate prefill endpoint."""

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool: ...


@runtime_checkable
class Parser(Plugin, Protocol):
    """RequestParsing: a request body -> the InferenceRequest the scheduler sees. `paths`
    are the path suffixes it claims (the longest claim across parsers wins); none makes it
    the fallback for unclaimed paths. A body it cannot parse raises InferenceError (400)."""

    paths: ClassVar[tuple[str, ...]]

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str,
                      path: str) -> InferenceRequest: ...


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


class EveryProfileOnce:
    """A profile handler's pick_profiles that runs every configured profile once, together
    (single-profile-handler; data-parallel-profile-handler, whose one profile is checked)."""

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        return {} if results else profiles


# extension point -> the method a plugin implements to take part in it
EXTENSION_POINTS: dict[str, str] = {
    "Screener": "screen",  # once per request before PrepareData: screen(request, endpoints) -> the endpoints kept
    "PrepareData": "prepare_request_data",
    "Filter": "filter",
    "Scorer": "score",
    "Picker": "pick",
    "ProfileHandler": "pick_profiles",
    "Admitter": "admit_request",  # after PrepareData, before scheduling: None admits, else the deny reason
    "PreRequest": "pre_request",
    "ResponseReceived": "response_received",
    "ResponseStreaming": "response_streaming",
    "ResponseComplete": "response_complete",
    "EndpointsChanged": "endpoints_removed",
    "SaturationDetector": "saturation",
    "PDDecider": "disaggregate",  # called by the P/D profile handler, not by a runner
    "Parser": "parse_request",  # called by the director's parser chain (requestHandler.parsers)
}


def extension_points(plugin: object) -> frozenset[str]:
    """The extension points a plugin (or plugin class) takes part in."""
    return frozenset(point for point, method in EXTENSION_POINTS.items() if callable(getattr(plugin, method, None)))


class NamedPlugin:
    """Base for plugins that take no parameters and need nothing from the handle."""

    type_name: ClassVar[str]

    def __init__(self, name: str, params: None = None, handle: PluginHandle | None = None) -> None:
        self.name = name


P = TypeVar("P")


class ConfiguredPlugin(Generic[P]):
    """Base for plugins with parameters: keeps the name and the parsed `Params` (the
    dataclass's defaults when the config gives none; `self.params`), checked by their
    `validate()` when they have one, and hands them and the handle to `configure`."""

    type_name: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, name: str, params: P | None, handle: PluginHandle) -> None:
        self.name = name
        self.params: P = params if params is not None else self.Params()
        validate = getattr(self.params, "validate", None)
        if validate is not None:
            validate()
        self.configure(self.params, handle)

    def configure(self, p: P, handle: PluginHandle) -> None:
        """What the plugin derives from its parameters and the handle; nothing by default."""

    def own_key(self, what: str, value_type: type[T]) -> DataKey[T]:
        """A CycleState key private to this plugin instance ("<type>-<what>/<name>")."""
        return DataKey(f"{self.type_name}-{what}/{self.name}", value_type)

    def producer_key(self, data: DataKey[T], consumer: ProducerParam) -> DataKey[T]:
        """`data` as published by the producer instance this plugin reads: the one its
        parameter `consumer.param` names, else the default instance (`consumer.producer_type`)."""
        return data.of(getattr(self.params, consumer.param, "") or consumer.producer_type)


# --------------------------------------------------------------------------- handle
@dataclass(slots=True)
class PluginHandle:
    """What a plugin's constructor may use besides its parameters: other plugin
    instances by name (for plugins that compose, e.g. a profile handler finding its
    decider), a monotonic clock (virtual in the cluster simulation), a random source,
    the metrics facility a plugin registers its own Prometheus metrics through, and the
    pool's endpoints as a read-only snapshot (the reference's Handle.PodList)."""

    plugins: Mapping[str, Plugin] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    # Randomness for pickers and exploration; seed it for reproducible runs (simulation, tests).
    rng: random.Random = field(default_factory=lambda: random.Random())
    metrics: PluginMetrics = field(default_factory=PluginMetrics)  # default: a private registry
    # The pool's endpoints now (a new tuple whenever the set changes); default: none known.
    endpoints: Callable[[], Sequence[Endpoint]] = tuple

    def plugin(self, name: str) -> Plugin:
        return self.plugins[name]


