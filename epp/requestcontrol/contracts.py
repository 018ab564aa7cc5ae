"""What the director calls on the parts around it: the configured plugin set and the
admission gate. Narrow on purpose: the director needs nothing else from them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from epp.framework import CycleState, Endpoint, InferenceRequest, ResponseInfo, SchedulingResult
from epp.scheduling.scheduler import SchedulingTrace

__all__ = ["AdmissionGate", "Release", "RequestPlugins", "ResponseHook"]

Release = Callable[[], None]  # hands back an admission slot; safe to call more than once
ResponseHook = Callable[[InferenceRequest, ResponseInfo, Endpoint], None]


class RequestPlugins(Protocol):
    """The plugin set one request runs through: the producers' asynchronous step (awaited only
    when `prefetches` is not empty), a scheduling cycle, then the response hooks."""

    @property
    def prefetches(self) -> Sequence[Callable[[InferenceRequest], Awaitable[None]]]: ...

    async def prefetch(self, request: InferenceRequest) -> None: ...

    def run_cycle(self, request: InferenceRequest, candidates: Sequence[Endpoint], *,
                  trace: SchedulingTrace | None = None,
                  commit: bool = True) -> tuple[CycleState, SchedulingResult]: ...

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint) -> None: ...

    def response_streaming(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint) -> None: ...

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint) -> None: ...


class AdmissionGate(Protocol):
    """Flow control: admits a request (possibly after queueing) or raises InferenceError."""

    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Release: ...
