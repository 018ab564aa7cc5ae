"""One scheduling cycle: the profile handler chooses profiles; each profile runs its
filters in sequence (an empty result fails the profile), its weighted scorers
(total = sum of weight * clamp(score, 0, 1), no normalisation) and its picker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter

from epp.errors import resource_exhausted, service_unavailable
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
    ScoredEndpoint,
)

# observe(extension_point, plugin_type, plugin_name, seconds)
Observer = Callable[[str, str, str, float], None]


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


def _type(plugin: object) -> str:
    return getattr(plugin, "type_name", type(plugin).__name__)


def _clamp(s: float) -> float:
    # NaN fails both comparisons and would poison the total: treat as 0.
    if s >= 1.0:
        return 1.0
    if s > 0.0:
        return s
    return 0.0


class Scheduler:
    def __init__(self, profiles: Mapping[str, SchedulerProfile], handler: ProfileHandler,
                 observe: Observer | None = None) -> None:
        self.profiles = dict(profiles)
        self.handler = handler
        self.observe = observe

    def schedule(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint],
                 trace: SchedulingTrace | None = None) -> SchedulingResult:
        if not candidates:
            raise service_unavailable("no candidate endpoints for the request")
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
            raise resource_exhausted("failed to find candidate endpoints for serving the request")
        return result

    def run_profile(self, profile: SchedulerProfile, cycle: CycleState, request: InferenceRequest,
                    candidates: Sequence[Endpoint], trace: SchedulingTrace | None = None) -> ProfileRunResult | None:
        obs = self.observe
        pt: ProfileTrace | None = None
        if trace is not None:
            pt = ProfileTrace(profile.name, [e.name for e in candidates], picker=profile.picker.name)
            trace.profiles.append(pt)
        endpoints = candidates
        for f in profile.filters:
            if obs is None:
                endpoints = f.filter(cycle, request, endpoints)
            else:
                t0 = perf_counter()
                endpoints = f.filter(cycle, request, endpoints)
                obs("Filter", _type(f), f.name, perf_counter() - t0)
            if pt is not None:
                pt.filters.append(FilterTrace(f.name, _type(f), [e.name for e in endpoints]))
            if not endpoints:
                if pt is not None:
                    pt.failed = True
                return None

        n = len(endpoints)
        totals = [0.0] * n
        for scorer, weight in profile.scorers:
            if obs is None:
                scores = scorer.score(cycle, request, endpoints)
            else:
                t0 = perf_counter()
                scores = scorer.score(cycle, request, endpoints)
                obs("Scorer", _type(scorer), scorer.name, perf_counter() - t0)
            if pt is not None:
                pt.scorers.append(ScorerTrace(scorer.name, _type(scorer), weight,
                                              {e.name: float(s) for e, s in zip(endpoints, scores, strict=False)}))
            if len(scores) != n:
                raise ValueError(f"scorer {scorer.name!r} returned {len(scores)} scores for {n} endpoints")
            # Fast path: scores already in [0, 1] (a NaN makes the sum NaN and fails the check).
            # Lengths were checked above, so zip needs no strict=True (measurable here).
            if n and 0.0 <= min(scores) and max(scores) <= 1.0 and (total := sum(scores)) == total:
                totals = [t + weight * s for t, s in zip(totals, scores)]  # noqa: B905
            else:
                totals = [t + weight * _clamp(s) for t, s in zip(totals, scores)]  # noqa: B905

        picker = profile.picker
        t0 = perf_counter() if obs is not None else 0.0
        fast = getattr(picker, "pick_scores", None)
        if fast is not None:  # built-in pickers: no ScoredEndpoint per endpoint
            result = fast(cycle, endpoints, totals)
        else:
            result = picker.pick(cycle, list(map(ScoredEndpoint, endpoints, totals)))
        if obs is not None:
            obs("Picker", _type(picker), picker.name, perf_counter() - t0)
        if pt is not None:
            pt.totals = {e.name: t for e, t in zip(endpoints, totals, strict=True)}
            pt.picked = [e.name for e in result.targets]
        if not result.targets:
            return None
        return result
