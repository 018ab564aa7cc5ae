"""One scheduling cycle: the profile handler chooses profiles; each profile runs its
filters in sequence (an empty result fails the profile), its weighted scorers
(total = sum of weight * clamp(score, 0, 1), no normalisation) and its picker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from epp.errors import REJECTED_NO_ENDPOINTS, REJECTED_SATURATED, resource_exhausted, service_unavailable
from epp.framework import (
    CycleState,
    Endpoint,
    Filter,
    InferenceRequest,
    Picker,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)
from epp.timing import Observed, Observer, timed, type_name

__all__ = ["FilterTrace", "Observer", "ProfileTrace", "Scheduler", "SchedulingTrace", "ScorerTrace"]


# --------------------------------------------------------------------------- trace (for `epp explain`)
@dataclass(slots=True)
class FilterTrace:
    name: str
    type: str
    kept: list[str]  # endpoint names


@dataclass(slots=True)
class ScorerTrace:
    name: str
    type: str
    weight: float
    scores: dict[str, float]  # endpoint name -> raw score (before clamp and weight)


@dataclass(slots=True)
class ProfileTrace:
    name: str
    candidates: list[str]
    filters: list[FilterTrace] = field(default_factory=list)
    scorers: list[ScorerTrace] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)  # endpoint name -> weighted total
    picker: str = ""
    picked: list[str] = field(default_factory=list)  # primary first
    failed: bool = False  # filters left no endpoint


@dataclass(slots=True)
class SchedulingTrace:
    """Why a request went where it went: one entry per profile run, in run order."""

    profiles: list[ProfileTrace] = field(default_factory=list)
    primary_profile: str = ""


def _clamp(s: float) -> float:
    # NaN fails both comparisons and would poison the total: treat as 0.
    if s >= 1.0:
        return 1.0
    if s > 0.0:
        return s
    return 0.0


@dataclass(slots=True)
class _ProfileRun:
    """A profile's plugins with the calls that run them (timed when observed)."""

    profile: SchedulerProfile
    filters: list[tuple[Filter, Callable[..., Sequence[Endpoint]]]]
    scorers: list[tuple[Scorer, float, Callable[..., Sequence[float]]]]
    pick: Callable[[CycleState, Sequence[Endpoint], list[float]], ProfileRunResult]


def _pick_scores(picker: Picker) -> Callable[[CycleState, Sequence[Endpoint], list[float]], ProfileRunResult]:
    fast = getattr(picker, "pick_scores", None)
    if fast is not None:  # built-in pickers: no ScoredEndpoint per endpoint
        return fast

    def pick(cycle: CycleState, endpoints: Sequence[Endpoint], totals: list[float]) -> ProfileRunResult:
        return picker.pick(cycle, list(map(ScoredEndpoint, endpoints, totals)))

    return pick


def _compile(profile: SchedulerProfile, observe: Observer | None) -> _ProfileRun:
    return _ProfileRun(
        profile,
        [(f, timed("Filter", f, f.filter, observe)) for f in profile.filters],
        [(s, w, timed("Scorer", s, s.score, observe)) for s, w in profile.scorers],
        timed("Picker", profile.picker, _pick_scores(profile.picker), observe),
    )


class Scheduler(Observed):
    def __init__(self, profiles: Mapping[str, SchedulerProfile], handler: ProfileHandler,
                 observe: Observer | None = None) -> None:
        self.profiles = dict(profiles)
        self.handler = handler
        # --emit-endpoint-scores (epp.server): each ProfileRunResult carries every scored endpoint's total
        self.collect_scores = False
        self.observe = observe

    def _rebuild(self, fn: Observer | None) -> None:
        self._runs = {name: _compile(p, fn) for name, p in self.profiles.items()}

    def schedule(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint],
                 trace: SchedulingTrace | None = None) -> SchedulingResult:
        if not candidates:
            raise service_unavailable("no candidate endpoints for the request", REJECTED_NO_ENDPOINTS)
        results: dict[str, ProfileRunResult | None] = {}
        while True:
            chosen = self.handler.pick_profiles(cycle, request, self.profiles, results)
            if not chosen:
                break
            progressed = False
            for name, profile in chosen.items():
                if name in results:
                    continue
                results[name] = self.run_profile(profile, cycle, request, candidates, trace)
                progressed = True
            if not progressed:  # a handler that keeps offering done profiles must not spin
                break
        result = self.handler.process_results(cycle, request, results)
        if trace is not None:
            trace.primary_profile = result.primary_profile
        if not result.targets:
            raise resource_exhausted("failed to find candidate endpoints for serving the request", REJECTED_SATURATED)
        return result

    def run_profile(self, profile: SchedulerProfile, cycle: CycleState, request: InferenceRequest,
                    candidates: Sequence[Endpoint], trace: SchedulingTrace | None = None) -> ProfileRunResult | None:
        run = self._runs.get(profile.name)
        if run is None or run.profile is not profile:  # a profile the handler made up
            run = _compile(profile, self._observe)
        pt: ProfileTrace | None = None
        if trace is not None:
            pt = ProfileTrace(profile.name, [e.name for e in candidates], picker=profile.picker.name)
            trace.profiles.append(pt)
        endpoints = candidates
        for f, call in run.filters:
            endpoints = call(cycle, request, endpoints)
            if pt is not None:
                pt.filters.append(FilterTrace(f.name, type_name(f), [e.name for e in endpoints]))
            if not endpoints:
                if pt is not None:
                    pt.failed = True
                return None

        n = len(endpoints)
        totals = [0.0] * n
        for scorer, weight, call in run.scorers:
            scores = call(cycle, request, endpoints)
            if pt is not None:
                pt.scorers.append(ScorerTrace(scorer.name, type_name(scorer), weight,
                                              {e.name: float(s) for e, s in zip(endpoints, scores, strict=False)}))
            if len(scores) != n:
                raise ValueError(f"scorer {scorer.name!r} returned {len(scores)} scores for {n} endpoints")
            # Fast path: scores already in [0, 1] (a NaN makes the sum NaN and fails the check).
            # Lengths were checked above, so zip needs no strict=True (measurable here).
            if n and 0.0 <= min(scores) and max(scores) <= 1.0 and (total := sum(scores)) == total:
                totals = [t + weight * s for t, s in zip(totals, scores)]  # noqa: B905
            else:
                totals = [t + weight * _clamp(s) for t, s in zip(totals, scores)]  # noqa: B905

        result = run.pick(cycle, endpoints, totals)
        if pt is not None:
            pt.totals = {e.name: t for e, t in zip(endpoints, totals, strict=True)}
            pt.picked = [e.name for e in result.targets]
        if not result.targets:
            return None
        if self.collect_scores:  # --emit-endpoint-scores; the built-in pickers leave endpoints/totals as they were
            result.scores = {e.hostport: t for e, t in zip(endpoints, totals)}  # noqa: B905 - lengths checked
        return result
