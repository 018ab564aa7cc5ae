"""disagg-profile-handler: encode / prefill / decode disaggregation (reference
pkg/epp/framework/plugins/scheduling/profilehandler/disagg/disagg_profile_handler.go).

Decode always runs; a prefill stage (P/D) runs when its decider says so and an encode
stage (E/PD) when its decider says so, each only if its profile is configured. With no
decider configured for a stage, that stage is off. The decode endpoint is the target;
the decode side's routing sidecar learns the others from `x-prefiller-host-port`
(host:port) and `x-encoder-hosts-ports` (comma list)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import (
    CycleState,
    InferenceRequest,
    PDDecider,
    PluginHandle,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
    extension_points,
)
from epp.framework.types import ENCODERS_HEADER, PREFILLER_HEADER
from epp.scheduling.profiles.decisions import decision_counters, decision_type

log = logging.getLogger(__name__)

DECODE_FIRST, PREFILL_FIRST = "decode-first", "prefill-first"


def parse_stage_order(value: str) -> str:
    """The reference's ParseStageOrder: case, '-' and '_' ignored; '' = decode-first."""
    key = value.replace("-", "").replace("_", "").lower()
    if key in ("", "decodefirst", "decode"):
        return DECODE_FIRST
    if key in ("prefillfirst", "prefill"):
        return PREFILL_FIRST
    raise ValueError(f"stageOrder: invalid stage order {value!r}, must be {DECODE_FIRST!r} or {PREFILL_FIRST!r}")


@dataclass(slots=True)
class DisaggProfiles:
    decode: str = ""
    prefill: str = ""
    encode: str = ""


@dataclass(slots=True)
class DisaggDeciders:
    prefill: str = ""  # a decider plugin's name; "" = no P/D disaggregation
    encode: str = ""  # a decider plugin's name; "" = no E/PD disaggregation


# the deprecated flat form -> its nested key (deciderPluginName yields to prefillDeciderPluginName)
_FLAT = {"decodeProfile": "profiles.decode", "prefillProfile": "profiles.prefill", "encodeProfile": "profiles.encode",
         "prefillDeciderPluginName": "deciders.prefill", "deciderPluginName": "deciders.prefill",
         "encodeDeciderPluginName": "deciders.encode"}


@dataclass(slots=True)
class DisaggParams:
    """The nested form, or the deprecated flat one (pd-profile-handler's and the headers
    handlers' names, as the config loader maps those types here); not both."""

    stageOrder: str = ""
    profiles: DisaggProfiles | None = None
    deciders: DisaggDeciders | None = None
    # deprecated flat form
    decodeProfile: str = ""
    prefillProfile: str = ""
    encodeProfile: str = ""
    prefillDeciderPluginName: str = ""
    encodeDeciderPluginName: str = ""
    deciderPluginName: str = ""  # pd-profile-handler's name of deciders.prefill

    def flat_keys(self) -> list[str]:
        return [k for k in _FLAT if getattr(self, k)]

    def validate(self) -> None:
        flat = self.flat_keys()
        if flat and (self.profiles is not None or self.deciders is not None):
            raise ValueError(f"{flat[0]}: deprecated flat parameter beside the nested profiles/deciders; "
                             "use one format exclusively")
        self.stageOrder = parse_stage_order(self.stageOrder)
        if self.stageOrder == PREFILL_FIRST and self.resolved()[3][0]:
            raise ValueError(f"{self.resolved()[3][1]}: a prefill decider is not supported in the "
                             f"{PREFILL_FIRST} stage order")

    def resolved(self) -> tuple[str, str, str, tuple[str, str], tuple[str, str]]:
        """(decode, prefill, encode profile names, (prefill decider, its key), (encode decider, its key))."""
        profiles = self.profiles or DisaggProfiles()
        deciders = self.deciders or DisaggDeciders()
        prefill_decider = (deciders.prefill, "deciders.prefill")
        if self.prefillDeciderPluginName:
            prefill_decider = (self.prefillDeciderPluginName, "prefillDeciderPluginName")
        elif self.deciderPluginName:
            prefill_decider = (self.deciderPluginName, "deciderPluginName")
        encode_decider = (self.encodeDeciderPluginName, "encodeDeciderPluginName") if self.encodeDeciderPluginName \
            else (deciders.encode, "deciders.encode")
        return (self.decodeProfile or profiles.decode or "decode",
                self.prefillProfile or profiles.prefill or "prefill",
                self.encodeProfile or profiles.encode or "encode",
                prefill_decider, encode_decider)


def _decider(handle: PluginHandle, name: str, key: str) -> PDDecider | None:
    if not name:
        return None
    plugin = handle.plugins.get(name)
    if plugin is None:
        raise ValueError(f"parameters.{key}: no pd-decider plugin named {name!r} (a decider is declared before "
                         "the handler that uses it)")
    if "PDDecider" not in extension_points(plugin):
        raise ValueError(f"parameters.{key}: plugin {name!r} (type {getattr(plugin, 'type_name', '?')!r}) "
                         "is not a decider")
    return plugin  # type: ignore[return-value]


class DisaggProfileHandler:
    """Runs decode -> encode? -> prefill? (decode-first, the default: the deciders see the
    decode pick) or prefill? -> encode? -> decode (prefill-first: prefill runs whenever its
    profile is configured, no prefill decider). A stage whose profile fails is left out;
    decode failing fails the request."""

    type_name = "disagg-profile-handler"
    Params = DisaggParams

    def __init__(self, name: str, params: DisaggParams | None, handle: PluginHandle) -> None:
        p = params or DisaggParams()
        p.validate()
        self.name = name
        self.stage_order = p.stageOrder
        self.decode, self.prefill, self.encode, (prefill_name, prefill_key), (encode_name, encode_key) = p.resolved()
        self.prefill_decider = _decider(handle, prefill_name, prefill_key)
        self.encode_decider = _decider(handle, encode_name, encode_key)
        self._keys = {"decode": "profiles.decode", "prefill": "profiles.prefill", "encode": "profiles.encode"}
        if p.flat_keys():
            self._keys = {"decode": "decodeProfile", "prefill": "prefillProfile", "encode": "encodeProfile"}
            log.warning("disagg-profile-handler %r: deprecated flat parameters %s; use profiles/deciders",
                        name, ", ".join(p.flat_keys()))
        if self.prefill_decider is None:
            log.info("disagg-profile-handler %r: no prefill decider configured, P/D disaggregation disabled", name)
        self._skipped = f"disagg-skipped/{name}"  # cycle-state slot: stages whose decider said no
        self._decisions = decision_counters(handle.metrics)

    def check_profiles(self, names: Sequence[str]) -> None:
        """The decode profile must exist, and so must a stage's profile when its decider is set."""
        needed = [("decode", self.decode)]
        if self.prefill_decider is not None:
            needed.append(("prefill", self.prefill))
        if self.encode_decider is not None:
            needed.append(("encode", self.encode))
        for stage, profile in needed:
            if profile not in names:
                raise ValueError(f"parameters.{self._keys[stage]}: no scheduling profile named {profile!r}")

    def _asked(self, cycle: CycleState, stage: str) -> bool:
        skipped = cycle.get(self._skipped)
        return skipped is not None and stage in skipped

    def _skip(self, cycle: CycleState, stage: str) -> None:
        cycle.setdefault(self._skipped, set()).add(stage)

    def _stage(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
               results: Mapping[str, ProfileRunResult | None], profile: str, decider: PDDecider | None,
               decode: ProfileRunResult | None) -> Mapping[str, SchedulerProfile] | None:
        """The stage's profile if it should run now; None to go on to the next stage."""
        if profile not in profiles or profile in results or self._asked(cycle, profile):
            return None
        if decider is not None and decider.disaggregate(cycle, request, decode.targets[0] if decode else None):
            return {profile: profiles[profile]}
        self._skip(cycle, profile)
        return None

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if self.stage_order == PREFILL_FIRST:
            return self._prefill_first(cycle, request, profiles, results)
        if self.decode not in results:
            return {self.decode: profiles[self.decode]} if self.decode in profiles else {}
        decoded = results[self.decode]
        if decoded is None or not decoded.targets:
            return {}
        return (self._stage(cycle, request, profiles, results, self.encode, self.encode_decider, decoded)
                or self._stage(cycle, request, profiles, results, self.prefill, self.prefill_decider, decoded)
                or self._done(request, results))

    def _done(self, request: InferenceRequest, results: Mapping[str, ProfileRunResult | None]) -> dict:
        """Every stage ran or was skipped: count the decision (the reference's RecordDisaggDecision)."""
        decision = decision_type(results.get(self.encode) is not None, results.get(self.prefill) is not None)
        self._decisions.record(self.name, self.type_name, request.target_model, decision)
        return {}

    def _prefill_first(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                       results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if self.decode in results:
            decoded = results[self.decode]
            return self._done(request, results) if decoded is not None and decoded.targets else {}
        if self.prefill in profiles and self.prefill not in results:
            return {self.prefill: profiles[self.prefill]}
        encode = self._stage(cycle, request, profiles, results, self.encode, self.encode_decider, None)
        if encode:
            return encode
        return {self.decode: profiles[self.decode]} if self.decode in profiles else {}

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        kept = {name: r for name, r in results.items()
                if name == self.decode or (r is not None and name in (self.prefill, self.encode))}
        out = SchedulingResult(profile_results=kept, primary_profile=self.decode)
        decoded = results.get(self.decode)
        if decoded is None or not decoded.targets:
            return out  # no decode endpoint: the request fails, no header
        prefilled = kept.get(self.prefill)
        if prefilled is not None and prefilled.targets:
            out.headers[PREFILLER_HEADER] = prefilled.targets[0].hostport
        encoded = kept.get(self.encode)
        if encoded is not None and encoded.targets:
            out.headers[ENCODERS_HEADER] = ",".join(e.hostport for e in encoded.targets)
        return out
