"""Pickers: turn a profile's scored endpoints into targets (primary first, then fallbacks).

Randomness comes from `PluginHandle.rng`, so a seeded handle gives reproducible picks.
Besides the framework's `pick(cycle, scored)`, these pickers offer
`pick_scores(cycle, endpoints, totals)`, which the scheduler prefers because it needs no
ScoredEndpoint object per endpoint (a measurable share of a cycle at 256 endpoints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, PluginHandle, ProfileRunResult, ScoredEndpoint, bounded


@dataclass(slots=True)
class PickerParams:
    maxNumOfEndpoints: int = bounded(1, ge=1)


class _Picker:
    def __init__(self, name: str, params: PickerParams | None, handle: PluginHandle) -> None:
        self.name = name
        self.max_endpoints = (params or PickerParams()).maxNumOfEndpoints
        self.rng = handle.rng

    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult:
        return self.pick_scores(cycle, [s.endpoint for s in scored], [s.score for s in scored])

    def pick_scores(self, cycle: CycleState, endpoints: Sequence[Endpoint],
                    totals: Sequence[float]) -> ProfileRunResult:
        raise NotImplementedError


class MaxScorePicker(_Picker):
    """Shuffle, stable sort by score descending, take maxNumOfEndpoints: ties broken at random."""

    type_name = "max-score-picker"
    Params = PickerParams

    def pick_scores(self, cycle: CycleState, endpoints: Sequence[Endpoint],
                    totals: Sequence[float]) -> ProfileRunResult:
        n = len(endpoints)
        if not n:
            return ProfileRunResult([])
        if self.max_endpoints == 1:
            # Same distribution as shuffle + stable sort for k=1, without shuffling everything.
            best = max(totals)
            ties = [i for i in range(n) if totals[i] == best] if totals.count(best) > 1 else None
            if ties is None:
                return ProfileRunResult([endpoints[totals.index(best)]])
            return ProfileRunResult([endpoints[ties[int(self.rng.random() * len(ties))]]])
        order = list(range(n))
        self.rng.shuffle(order)
        order.sort(key=totals.__getitem__, reverse=True)  # stable: shuffled order breaks ties
        return ProfileRunResult([endpoints[i] for i in order[: self.max_endpoints]])


class RandomPicker(_Picker):
    type_name = "random-picker"
    Params = PickerParams

    def pick_scores(self, cycle: CycleState, endpoints: Sequence[Endpoint],
                    totals: Sequence[float]) -> ProfileRunResult:
        k = min(self.max_endpoints, len(endpoints))
        return ProfileRunResult(self.rng.sample(list(endpoints), k))


class WeightedRandomPicker(_Picker):
    """Weighted sampling without replacement (Efraimidis-Spirakis A-Res): key = U^(1/score),
    take the largest keys. Zero scores only fill in after every positive one; all zero: uniform."""

    type_name = "weighted-random-picker"
    Params = PickerParams

    def pick_scores(self, cycle: CycleState, endpoints: Sequence[Endpoint],
                    totals: Sequence[float]) -> ProfileRunResult:
        rnd = self.rng.random
        keys = []
        for s in totals:
            u = rnd()
            # Zero-score keys are negative so they sort after every positive-score key.
            keys.append(u ** (1.0 / s) if s > 0 else u - 1.0)
        order = sorted(range(len(endpoints)), key=keys.__getitem__, reverse=True)
        return ProfileRunResult([endpoints[i] for i in order[: self.max_endpoints]])
