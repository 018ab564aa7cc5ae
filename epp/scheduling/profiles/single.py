"""single-profile-handler: runs the one profile once; its result is the primary result."""

from __future__ import annotations

from collections.abc import Mapping

from epp.framework import (
    CycleState,
    EveryProfileOnce,
    InferenceRequest,
    NamedPlugin,
    ProfileRunResult,
    SchedulingResult,
)


class SingleProfileHandler(EveryProfileOnce, NamedPlugin):
    type_name = "single-profile-handler"

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        primary = next(iter(results), "")
        return SchedulingResult(profile_results=dict(results), primary_profile=primary)
