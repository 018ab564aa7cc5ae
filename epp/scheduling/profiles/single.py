"""single-profile-handler: runs the one profile once; its result is the primary result."""

from __future__ import annotations

from collections.abc import Mapping

from epp.framework import (
    CycleState,
    InferenceRequest,
    NamedPlugin,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
)


class SingleProfileHandler(NamedPlugin):
    type_name = "single-profile-handler"

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if results:
            return {}
        return profiles

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        primary = next(iter(results), "")
        return SchedulingResult(profile_results=dict(results), primary_profile=primary)
