"""disagg-profile-handler: prefill/decode disaggregation, and the P/D deciders it asks
whether a request's prefill should run on a separate endpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    NamedPlugin,
    PDDecider,
    PluginHandle,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
    bounded,
    extension_points,
)
from epp.framework.datakeys import APPROX_PREFIX_PRODUCER, PREFIX_MATCH_INFO, PREFIX_MATCH_PRODUCER

PREFILLER_HEADER = "x-prefiller-host-port"


@dataclass(slots=True)
class DisaggParams:
    decodeProfile: str = "decode"
    prefillProfile: str = "prefill"
    deciderPluginName: str = ""  # a *-pd-decider instance; "" = the first one configured (none: never split)


class DisaggProfileHandler:
    """Runs the decode profile first; if the decider approves, the prefill profile picks a
    prefill endpoint, announced upstream in `x-prefiller-host-port`. The decode endpoint
    stays the primary target; a failed prefill profile falls back to decode only."""

    type_name = "disagg-profile-handler"
    Params = DisaggParams

    def __init__(self, name: str, params: DisaggParams | None, handle: PluginHandle) -> None:
        p = params or DisaggParams()
        self.name = name
        self.decode = p.decodeProfile
        self.prefill = p.prefillProfile
        self._decider_name = p.deciderPluginName
        self._handle = handle
        self._decider: PDDecider | None = None
        self._decider_resolved = False

    def check_profiles(self, names: Sequence[str]) -> None:
        for key, profile in (("decodeProfile", self.decode), ("prefillProfile", self.prefill)):
            if profile not in names:
                raise ValueError(f"parameters.{key}: no scheduling profile named {profile!r}")
        if self._decider_name:
            plugin = self._handle.plugins.get(self._decider_name)
            if plugin is None or "PDDecider" not in extension_points(plugin):
                raise ValueError(f"parameters.deciderPluginName: no pd-decider plugin named {self._decider_name!r}")

    def _get_decider(self) -> PDDecider | None:
        if not self._decider_resolved:
            self._decider_resolved = True
            plugins = self._handle.plugins
            if self._decider_name:
                self._decider = plugins.get(self._decider_name)  # type: ignore[assignment]
            else:
                self._decider = next((p for p in plugins.values() if "PDDecider" in extension_points(p)), None)  # type: ignore[misc]
        return self._decider

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if self.decode not in results:
            return {self.decode: profiles[self.decode]}
        decoded = results[self.decode]
        if decoded is None or not decoded.targets or self.prefill in results:
            return {}
        decider = self._get_decider()
        if decider is not None and decider.disaggregate(cycle, request, decoded.targets[0]):
            return {self.prefill: profiles[self.prefill]}
        return {}

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        out = SchedulingResult(profile_results=dict(results), primary_profile=self.decode)
        prefilled = results.get(self.prefill)
        if prefilled is not None and prefilled.targets:
            out.headers[PREFILLER_HEADER] = prefilled.targets[0].hostport
        return out


@dataclass(slots=True)
class PrefixDeciderParams:
    nonCachedTokens: int = bounded(0, ge=0)  # 0 = never disaggregate
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName


class PrefixBasedPDDecider:
    """Disaggregate iff inputTokens >= N and inputTokens - cachedTokens(decode endpoint) >= N:
    a long prompt that is mostly cached on the decode endpoint is cheaper to prefill there."""

    type_name = "prefix-based-pd-decider"
    Params = PrefixDeciderParams
    consumes = (PREFIX_MATCH_PRODUCER,)

    def __init__(self, name: str, params: PrefixDeciderParams | None, handle: PluginHandle) -> None:
        p = params or PrefixDeciderParams()
        self.name = name
        self.threshold = p.nonCachedTokens
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName)

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        n = self.threshold
        if n <= 0:
            return False
        tokens = request.estimated_prompt_tokens
        if tokens < n:
            return False
        match = cycle.read(self._key)
        cached = match.cached_tokens(decode_endpoint) if match is not None else 0
        return tokens - cached >= n


class AlwaysDisaggPDDecider(NamedPlugin):
    type_name = "always-disagg-pd-decider"

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        return True
