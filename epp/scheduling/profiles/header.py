"""header-profile-handler (Alpha; reference pkg/epp/framework/plugins/scheduling/
profilehandler/headerprofile/header_profile_handler.go): a request header names the one
scheduling profile that runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import (
    ConfiguredPlugin,
    CycleState,
    InferenceRequest,
    PluginHandle,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
)

log = logging.getLogger(__name__)

DEFAULT_HEADER = "EPP-Profile"
DEFAULT_PROFILE = "decode"


@dataclass(slots=True)
class HeaderProfileParams:
    headerName: str = ""  # "" = EPP-Profile (matched case-insensitively)
    defaultProfile: str = ""  # "" = decode; run when the header is missing or blank


class HeaderProfileHandler(ConfiguredPlugin[HeaderProfileParams]):
    """With one configured profile, that one runs. Otherwise the header's (trimmed)
    value names the profile, the default profile when missing or blank; a value naming
    no profile schedules nothing (the request fails, as the reference's)."""

    type_name = "header-profile-handler"
    Params = HeaderProfileParams

    def configure(self, p: HeaderProfileParams, handle: PluginHandle) -> None:
        self.header = p.headerName.strip().lower() or DEFAULT_HEADER.lower()
        self.default = p.defaultProfile.strip() or DEFAULT_PROFILE

    def check_profiles(self, names: Sequence[str]) -> None:
        """Nothing to check: the reference accepts a default naming no profile (then a
        request without the header fails)."""

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if results:
            return {}
        if len(profiles) == 1:
            return profiles
        value = request.headers.get(self.header, "").strip()
        chosen = value or self.default
        profile = profiles.get(chosen)
        if profile is None:
            log.info("no scheduling profile selected for request_id=%s: %s", request.request_id,
                     f"no scheduling profile configured for {self.header!r} header value {value[:64]!r}" if value
                     else f"defaultProfile {self.default!r} is not a configured scheduling profile")
            return {}
        return {chosen: profile}

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        name = next(iter(results), "")
        return SchedulingResult(profile_results=dict(results), primary_profile=name)
