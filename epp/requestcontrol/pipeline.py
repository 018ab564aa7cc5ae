"""The configured plugins wired into one object the director calls per request:
prepare-data plugins, the scheduler, pre-request hooks, response hooks."""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

from epp.config import ConfigError, EndpointPickerConfig, FlowControlConfig, load_config
from epp.errors import service_unavailable
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    Plugin,
    PluginError,
    PluginHandle,
    ResponseInfo,
    SchedulerProfile,
    SchedulingResult,
)
from epp.framework.registry import build_plugin
from epp.scheduling.scheduler import Observer, Scheduler, SchedulingTrace

__all__ = ["PickerPipeline", "build_pipeline", "load_pipeline"]


def _has(plugin: object, method: str) -> bool:
    return callable(getattr(plugin, method, None))


def _type(plugin: object) -> str:
    return getattr(plugin, "type_name", type(plugin).__name__)


class PickerPipeline:
    def __init__(self, config: EndpointPickerConfig, plugins: dict[str, Plugin], scheduler: Scheduler,
                 observe: Observer | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.scheduler = scheduler
        self.saturation_detector = plugins.get(config.saturation_detector)
        self.feature_gates: frozenset[str] = config.feature_gates
        self.flow_control: FlowControlConfig | None = config.flow_control
        self.engine_metrics: dict[str, Any] = config.engine_metrics
        # Only plugins that take part in scheduling or are named as the detector get hooks;
        # config order is kept so hooks run in a predictable order.
        ps = list(plugins.values())
        self._prepare = [p for p in ps if _has(p, "prepare_request_data")]
        self._pre_request = [p for p in ps if _has(p, "pre_request")]
        self._response_received = [p for p in ps if _has(p, "response_received")]
        self._response_streaming = [p for p in ps if _has(p, "response_streaming")]
        self._response_complete = [p for p in ps if _has(p, "response_complete")]
        self._endpoints_changed = [p for p in ps if _has(p, "endpoints_removed")]
        self._observe = observe
        scheduler.observe = observe

    @property
    def observe(self) -> Observer | None:
        return self._observe

    @observe.setter
    def observe(self, fn: Observer | None) -> None:
        self._observe = fn
        self.scheduler.observe = fn

    @property
    def wants_response_body(self) -> bool:
        """Whether any plugin needs per-chunk response hooks (else the server may skip body chunks)."""
        return bool(self._response_streaming)

    # ------------------------------------------------------------------ the cycle
    def run_cycle(self, request: InferenceRequest, candidates: Sequence[Endpoint], *,
                  trace: SchedulingTrace | None = None, commit: bool = True) -> tuple[CycleState, SchedulingResult]:
        """Schedule one request. commit=False (explain) leaves every plugin's state untouched."""
        if not candidates:
            raise service_unavailable("no candidate endpoints for the request")
        cycle = CycleState()
        obs = self._observe
        for p in self._prepare:
            if obs is None:
                p.prepare_request_data(cycle, request, candidates)
            else:
                t0 = perf_counter()
                p.prepare_request_data(cycle, request, candidates)
                obs("PrepareData", _type(p), p.name, perf_counter() - t0)
        result = self.scheduler.schedule(cycle, request, candidates, trace)
        if commit:
            for p in self._pre_request:
                if obs is None:
                    p.pre_request(cycle, request, result)
                else:
                    t0 = perf_counter()
                    p.pre_request(cycle, request, result)
                    obs("PreRequest", _type(p), p.name, perf_counter() - t0)
        return cycle, result

    # ------------------------------------------------------------------ response hooks
    def _hooks(self, plugins: list, point: str, method: str, request: InferenceRequest, info: ResponseInfo,
               target: Endpoint | None) -> None:
        obs = self._observe
        for p in plugins:
            if obs is None:
                getattr(p, method)(request, info, target)
            else:
                t0 = perf_counter()
                getattr(p, method)(request, info, target)
                obs(point, _type(p), p.name, perf_counter() - t0)

    def response_received(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        self._hooks(self._response_received, "ResponseReceived", "response_received", request, info, target)

    def response_streaming(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        self._hooks(self._response_streaming, "ResponseStreaming", "response_streaming", request, info, target)

    def response_complete(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        self._hooks(self._response_complete, "ResponseComplete", "response_complete", request, info, target)

    # ------------------------------------------------------------------ pool
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for p in self._endpoints_changed:
            p.endpoints_removed(endpoints)

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        det = self.saturation_detector
        if det is None:
            return 0.0
        return det.saturation(endpoints)


def build_pipeline(config: EndpointPickerConfig, handle: PluginHandle | None = None, *,
                   observe: Observer | None = None) -> PickerPipeline:
    """Instantiate every plugin of `config` (in order, so later plugins can look up earlier
    ones through the handle) and wire profiles, handler and saturation detector."""
    handle = handle if handle is not None else PluginHandle()
    plugins: dict[str, Plugin] = {}
    handle.plugins = plugins  # plugins see the instances built so far (and later ones at run time)
    for spec in config.plugins:
        try:
            plugins[spec.name] = build_plugin(spec.type, spec.name, spec.parameters, handle, spec.where)
        except PluginError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{spec.where}: {e}") from None
    profiles: dict[str, SchedulerProfile] = {}
    for prof in config.scheduling_profiles:
        filters, scorers, picker = [], [], None
        for ref in prof.plugins:
            p = plugins[ref.plugin_ref]
            if _has(p, "filter"):
                filters.append(p)
            if _has(p, "score"):
                scorers.append((p, ref.weight))
            if _has(p, "pick"):
                picker = p
        assert picker is not None  # config resolution guarantees one
        profiles[prof.name] = SchedulerProfile(prof.name, filters, scorers, picker)
    handler = plugins[config.profile_handler]
    check = getattr(handler, "check_profiles", None)
    if check is not None:  # e.g. the P/D handler needs its decode and prefill profiles
        try:
            check(list(profiles))
        except ValueError as e:
            where = config.plugin(config.profile_handler).where
            raise ConfigError(f"{where}.{e}") from None
    scheduler = Scheduler(profiles, handler)
    return PickerPipeline(config, plugins, scheduler, observe)


def load_pipeline(text: str | None, handle: PluginHandle | None = None, *,
                  observe: Observer | None = None) -> PickerPipeline:
    return build_pipeline(load_config(text), handle, observe=observe)
