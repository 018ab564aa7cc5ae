"""Fairness policies: which flow (fairness id) of a priority band is served next.

The reference's FairnessPolicy plugins (pkg/epp/framework/plugins/flowcontrol/fairness):
global-strict-fairness-policy (the default) and round-robin-fairness-policy, neither with
parameters, and program-aware-fairness. The queues hand `pick_flow` the band's flow queues
by fairness id and the policy's own per-band state (made once by `new_state`); a flow queue
offers `head_key()` (its ordering policy's sort key of the head request, lowest first) and
`head()` (that request's Waiter: `request`, `enqueued`).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework import ConfiguredPlugin, InferenceRequest, NamedPlugin, PluginHandle, ResponseInfo, bounded


class FlowQueueView(Protocol):
    def __len__(self) -> int: ...

    def head_key(self) -> tuple[Any, ...]: ...

    def head(self) -> Any: ...


class GlobalStrictFairnessPolicy(NamedPlugin):
    """The flow whose head request comes first by the band's ordering policy, as if the
    band were one queue (global_strict.go)."""

    type_name = "global-strict-fairness-policy"

    def new_state(self) -> None:
        return None

    def pick_flow(self, flows: Mapping[str, FlowQueueView], state: None) -> str | None:
        best: str | None = None
        best_key: tuple[Any, ...] = ()
        for fid, queue in flows.items():
            if not len(queue):
                continue
            key = queue.head_key()
            if best is None or key < best_key:
                best, best_key = fid, key
        return best


@dataclass(slots=True)
class RoundRobinCursor:
    last: str | None = None  # the flow picked last


class RoundRobinFairnessPolicy(NamedPlugin):
    """The flows in turn, by fairness id order, starting after the one picked last
    (roundrobin.go: keys sorted, cursor = last selected). A flow that left the band since
    is placed where it sorted, so the turn continues with the next id after it."""

    type_name = "round-robin-fairness-policy"

    def new_state(self) -> RoundRobinCursor:
        return RoundRobinCursor()

    def pick_flow(self, flows: Mapping[str, FlowQueueView], state: RoundRobinCursor) -> str | None:
        keys = sorted(fid for fid, queue in flows.items() if len(queue))
        if not keys:
            state.last = None
            return None
        start = 0 if state.last is None else bisect.bisect_right(keys, state.last) % len(keys)
        state.last = keys[start]
        return state.last


# --------------------------------------------------------------------------- program-aware
WEIGHT_INPUT_TOKEN, WEIGHT_OUTPUT_TOKEN = 1, 2  # an output token costs about twice an input token
MAX_PROGRAMS = 10_000  # programs tracked (and their metric series); beyond, the longest-idle one goes
MAX_PENDING_WAITS = 10_000  # picked requests whose queue wait their PreRequest has not read yet


@dataclass(slots=True)
class ProgramAwareParams:
    strategy: str = "las"
    lasWeightService: float = bounded(0.8, ge=0)
    lasWeightHeadWait: float = bounded(0.2, ge=0)
    lasHalfLifeSeconds: float = bounded(60.0, ge=0)  # 0: attained service never decays
    evictionTtlSeconds: float = bounded(3600.0, ge=0)  # 0: programs are never evicted
    evictionSweepSeconds: float = bounded(300.0, gt=0)

    def validate(self) -> None:
        if self.strategy not in ("", "las"):
            raise ValueError(f'strategy: unknown scoring strategy {self.strategy!r}: only "las" is supported')


@dataclass(slots=True)
class Program:
    """One program's (fairness id's) record: its queue waits, requests in flight and its
    attained service in weighted tokens, decayed lazily to `anchor`."""

    last_completion: float
    dispatched: int = 0
    in_flight: int = 0
    waits: int = 0
    avg_wait_ms: float = 0.0
    service: float = 0.0
    anchor: float | None = None  # when decay was last folded into `service`


def range_normalize(v: float, lo: float, hi: float) -> float:
    return 0.5 if hi == lo else (v - lo) / (hi - lo)


def jain_index(values: list[float]) -> float:
    """Jain's fairness index; 1.0 (perfectly fair) for fewer than two values or all zero."""
    sq = sum(x * x for x in values)
    if len(values) <= 1 or sq == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * sq)


class ProgramAwareFairness(ConfiguredPlugin[ProgramAwareParams]):
    """program-aware-fairness (reference fairness/program-aware, strategy LAS, Least
    Attained Service): each flow is a program; the next flow is the one with the highest
    lasWeightService x (1 - normalised attained service) + lasWeightHeadWait x normalised
    head-of-queue wait (both min-max normalised over the band's non-empty flows, 0.5 when
    all equal). A completed request adds prompt + 2 x completion tokens to its program's
    service, which halves every lasHalfLifeSeconds. Also a PreRequest (dispatch counts, queue
    wait) and ResponseComplete (usage) plugin. Programs idle for evictionTtlSeconds with
    nothing in flight are dropped, checked every evictionSweepSeconds."""

    type_name = "program-aware-fairness"
    Params = ProgramAwareParams

    def configure(self, p: ProgramAwareParams, handle: PluginHandle) -> None:
        self.params = p
        self.clock = handle.clock
        self.rng = handle.rng
        self.programs: dict[str, Program] = {}
        self._waits: OrderedDict[str, float] = OrderedDict()  # request id -> its enqueue time
        self._last_sweep = self.clock()
        handle.metrics.add_collector(_ProgramMetrics(self))

    def new_state(self) -> None:
        return None

    def program(self, pid: str) -> Program:
        prog = self.programs.get(pid)
        if prog is None:
            if len(self.programs) >= MAX_PROGRAMS:
                self._evict_oldest()
            prog = self.programs[pid] = Program(last_completion=self.clock())
        return prog

    def service(self, prog: Program, now: float) -> float:
        """The program's attained service with decay folded in up to `now`."""
        if prog.anchor is not None and now > prog.anchor and self.params.lasHalfLifeSeconds > 0:
            prog.service *= 2.0 ** (-(now - prog.anchor) / self.params.lasHalfLifeSeconds)
        if prog.anchor is None or now > prog.anchor:
            prog.anchor = now
        return prog.service

    # ------------------------------------------------------------------ FairnessPolicy
    def pick_flow(self, flows: Mapping[str, Any], state: None) -> str | None:
        now = self.clock()
        self._sweep(now)
        scored: list[tuple[str, float, float]] = []
        for fid, queue in flows.items():
            if len(queue):
                wait_ms = float(int((now - queue.head().enqueued) * 1000))  # whole milliseconds, as the reference
                scored.append((fid, self.service(self.program(fid), now), wait_ms))
        if not scored:
            return None
        lo_s, hi_s = min(s for _, s, _ in scored), max(s for _, s, _ in scored)
        lo_w, hi_w = min(w for _, _, w in scored), max(w for _, _, w in scored)
        p = self.params
        self.rng.shuffle(scored)  # equal scores: any of them (the reference iterates a Go map)
        best, best_score = None, float("-inf")
        for fid, s, w in scored:
            score = p.lasWeightService * (1 - range_normalize(s, lo_s, hi_s)) + \
                p.lasWeightHeadWait * range_normalize(w, lo_w, hi_w)
            if score > best_score:
                best, best_score = fid, score
        head = flows[best].head()
        self._waits[head.request.request_id] = head.enqueued
        if len(self._waits) > MAX_PENDING_WAITS:
            self._waits.popitem(last=False)
        return best

    def fairness_index(self) -> float:
        """Jain's index over the programs' mean queue waits (those with a wait observed)."""
        return jain_index([q.avg_wait_ms for q in self.programs.values() if q.waits])

    # ------------------------------------------------------------------ PreRequest / ResponseComplete
    def pre_request(self, cycle: Any, request: InferenceRequest, result: Any) -> None:
        prog = self.program(request.fairness_id)
        prog.in_flight += 1
        prog.dispatched += 1
        enqueued = self._waits.pop(request.request_id, None)
        if enqueued is not None:  # it waited in a queue (not admitted straight through)
            prog.waits += 1
            wait_ms = float(int((self.clock() - enqueued) * 1000))
            prog.avg_wait_ms += (wait_ms - prog.avg_wait_ms) / prog.waits

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Any) -> None:
        prog = self.programs.get(request.fairness_id)
        if prog is None:
            return
        now = self.clock()
        cost = WEIGHT_INPUT_TOKEN * response.prompt_tokens + WEIGHT_OUTPUT_TOKEN * response.completion_tokens
        prog.service = self.service(prog, now) + cost
        prog.in_flight = max(0, prog.in_flight - 1)
        prog.last_completion = now

    # ------------------------------------------------------------------ eviction
    def _sweep(self, now: float) -> None:
        p = self.params
        if p.evictionTtlSeconds <= 0 or now - self._last_sweep < p.evictionSweepSeconds:
            return
        self._last_sweep = now
        for pid in [pid for pid, prog in self.programs.items()
                    if not prog.in_flight and now - prog.last_completion > p.evictionTtlSeconds]:
            del self.programs[pid]

    def _evict_oldest(self) -> None:
        idle = [(prog.last_completion, pid) for pid, prog in self.programs.items() if not prog.in_flight]
        if idle:
            del self.programs[min(idle)[1]]


class _ProgramMetrics(Collector):
    """llm_d_epp_program_aware_{jains_fairness_index, avg_wait_time_milliseconds,
    attained_service_tokens} of one policy instance (series bounded by MAX_PROGRAMS)."""

    def __init__(self, policy: ProgramAwareFairness) -> None:
        self.policy = policy

    def collect(self) -> Iterable[Metric]:
        p = self.policy
        index = GaugeMetricFamily("llm_d_epp_program_aware_jains_fairness_index",
                                  "Jain's Fairness Index over the average wait time per program.",
                                  value=p.fairness_index())
        wait = GaugeMetricFamily("llm_d_epp_program_aware_avg_wait_time_milliseconds",
                                 "Cumulative mean of flow-control queue wait time per program in milliseconds.",
                                 labels=["program_id"])
        service = GaugeMetricFamily("llm_d_epp_program_aware_attained_service_tokens",
                                    "Time-decayed attained service (weighted tokens consumed) per program.",
                                    labels=["program_id"])
        for pid, prog in list(p.programs.items()):
            if prog.dispatched:
                wait.add_metric([pid], prog.avg_wait_ms)
            if prog.anchor is not None:
                service.add_metric([pid], prog.service)
        return [index, wait, service]
