"""The configured plugins, wired by extension point: what the director runs one request
through. run_cycle = PrepareData hooks -> the scheduler (profiles: filters -> weighted
scorers -> picker) -> PreRequest hooks; then the response hooks; EndpointsChanged when
the pool shrinks; the saturation detector for admission. Built from a config by
epp.assembly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from epp.config import EndpointPickerConfig, FlowControlConfig
from epp.errors import REJECTED_NO_ENDPOINTS, InferenceError, service_unavailable
from epp.framework import (
    EXTENSION_POINTS,
    CycleState,
    Endpoint,
    InferenceRequest,
    Plugin,
    ResponseInfo,
    SchedulingResult,
    extension_points,
)
from epp.scheduling.scheduler import Scheduler, SchedulingTrace
from epp.timing import Observed, Observer, timed

__all__ = ["PluginSet"]

# the extension points run here (the scheduler runs Filter, Scorer, Picker)
HOOKS = {point: EXTENSION_POINTS[point] for point in (
    "Screener", "PrepareData", "Admitter", "PreRequest", "ResponseReceived", "ResponseStreaming", "ResponseComplete", "EndpointsChanged")}


class PluginSet(Observed):
    def __init__(self, config: EndpointPickerConfig, plugins: dict[str, Plugin], scheduler: Scheduler,
                 observe: Observer | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.scheduler = scheduler
        self.saturation_detector = plugins.get(config.saturation_detector)
        self.feature_gates: frozenset[str] = config.feature_gates
        self.flow_control: FlowControlConfig | None = config.flow_control
        self.engine_metrics: dict[str, Any] = config.engine_metrics
        self.parsers: list[Plugin] = [plugins[n] for n in config.parsers]  # requestHandler.parsers, in order
        # dataLayer: each source with its extractors, and the discovery plugin (None: the pool flags)
        self.data_sources: list[tuple[Plugin, list[Plugin]]] = [
            (plugins[s.plugin_ref], [plugins[e] for e in s.extractors]) for s in config.data_layer.sources]
        self.discovery: Plugin | None = plugins.get(config.data_layer.discovery) if config.data_layer.discovery \
            else None
        # Config order is kept so hooks run in a predictable order.
        points = {name: extension_points(p) for name, p in plugins.items()}
        self._members = {point: [p for name, p in plugins.items() if point in points[name]] for point in HOOKS}
        # producers that first await I/O (token-producer's vllm backend): awaited by the director before the cycle
        self.prefetches: list[Callable[[InferenceRequest], Awaitable[None]]] = [
            f for f in (getattr(p, "prefetch_request_data", None) for p in self._members["PrepareData"]) if callable(f)]
        self.observe = observe

    def _rebuild(self, fn: Observer | None) -> None:
        self.scheduler.observe = fn
        calls: dict[str, list[Callable[..., Any]]] = {
            point: [timed(point, p, getattr(p, HOOKS[point]), fn) for p in members]
            for point, members in self._members.items()}
        self._screen = calls["Screener"]
        self._previews = [getattr(p, "preview", None) or call
                          for p, call in zip(self._members["Screener"], self._screen, strict=True)]
        self._prepare = calls["PrepareData"]
        self._admit = calls["Admitter"]
        self._pre_request = calls["PreRequest"]
        self._response_received = calls["ResponseReceived"]
        self._response_streaming = calls["ResponseStreaming"]
        self._response_complete = calls["ResponseComplete"]
        self._endpoints_changed = [getattr(p, HOOKS["EndpointsChanged"]) for p in self._members["EndpointsChanged"]]

    @property
    def wants_response_body(self) -> bool:
        """Whether any plugin needs per-chunk response hooks (else the server may skip body chunks)."""
        return bool(self._response_streaming)

    # ------------------------------------------------------------------ the cycle
    async def prefetch(self, request: InferenceRequest) -> None:
        """The asynchronous step before PrepareData: each producer bounds its own wait and never raises."""
        if len(self.prefetches) == 1:
            await self.prefetches[0](request)
        else:
            await asyncio.gather(*(f(request) for f in self.prefetches))

    def run_cycle(self, request: InferenceRequest, candidates: Sequence[Endpoint], *,
                  trace: SchedulingTrace | None = None, commit: bool = True) -> tuple[CycleState, SchedulingResult]:
        """Schedule one request. commit=False (explain) leaves every plugin's state untouched."""
        if not candidates:
            raise service_unavailable("no candidate endpoints for the request", REJECTED_NO_ENDPOINTS)
        if self._screen:
            candidates = self._screened(request, candidates, commit)
        cycle = CycleState()
        for prepare in self._prepare:
            prepare(cycle, request, candidates)
        if commit:  # Admit plugins; a denial is 500, as the reference's director answers it
            for admit in self._admit:
                reason = admit(cycle, request, candidates)
                if reason is not None:
                    raise InferenceError("Internal", f"request cannot be admitted: {reason}")
        result = self.scheduler.schedule(cycle, request, candidates, trace)
        if commit:
            for pre_request in self._pre_request:
                pre_request(cycle, request, result)
        return cycle, result

    def _screened(self, request: InferenceRequest, candidates: Sequence[Endpoint],
                  commit: bool) -> Sequence[Endpoint]:
        """Each screener sees every candidate; an endpoint survives when all keep it (the reference's
        runScreeners); none left is 503. Without commit (explain), a screener that keeps state offers
        `preview(request, endpoints)`, the same verdict with nothing recorded."""
        kept = list(candidates)
        screens = self._screen if commit else self._previews
        for screen in screens:
            allowed = {id(e) for e in screen(request, candidates)}
            kept = [e for e in kept if id(e) in allowed]
        if not kept:
            raise service_unavailable("screeners eliminated all endpoint candidates", REJECTED_NO_ENDPOINTS)
        return kept

    # ------------------------------------------------------------------ response hooks
    def response_received(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        for hook in self._response_received:
            hook(request, info, target)

    def response_streaming(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        for hook in self._response_streaming:
            hook(request, info, target)

    def response_complete(self, request: InferenceRequest, info: ResponseInfo, target: Endpoint | None) -> None:
        for hook in self._response_complete:
            hook(request, info, target)

    # ------------------------------------------------------------------ pool
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for hook in self._endpoints_changed:
            hook(endpoints)

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        det = self.saturation_detector
        if det is None:
            return 0.0
        return det.saturation(endpoints)
