"""data-parallel-profile-handler (reference pkg/epp/framework/plugins/scheduling/
profilehandler/dataparallel/dp_profile_handler.go): one profile picks a data-parallel
rank's endpoint; the request goes to the same pod's primary port, and the rank's
host:port rides along in `x-data-parallel-host-port` for the pod's routing sidecar.
The reference deprecates it (a single-profile handler with Istio >= 1.28.1 does the same)."""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
    bounded,
)
from epp.framework.types import DATA_PARALLEL_HEADER

log = logging.getLogger(__name__)

MAX_PRIMARY_ENDPOINTS = 4096  # rank endpoint -> its primary-port endpoint, least recently used dropped


@dataclass(slots=True)
class DataParallelParams:
    primaryPort: int = bounded(8000, ge=0, le=65535)  # the reference: 0 is accepted as is


class DataParallelProfileHandler:
    """Exactly one scheduling profile. The picked endpoints come back re-addressed to the
    primary port: one stable copy per rank endpoint (the rank's own Endpoint keeps its
    identity in the pool), so what is keyed by the target (the prefix index, in-flight
    counts) sees one endpoint per rank, not one per request."""

    type_name = "data-parallel-profile-handler"
    Params = DataParallelParams

    def __init__(self, name: str, params: DataParallelParams | None, handle: PluginHandle) -> None:
        p = params or DataParallelParams()
        self.name = name
        self.primary_port = p.primaryPort
        self._primary: OrderedDict[Endpoint, Endpoint] = OrderedDict()
        log.info("data-parallel-profile-handler %r is deprecated in the reference: use single-profile-handler "
                 "with Istio >= 1.28.1", name)

    def check_profiles(self, names: Sequence[str]) -> None:
        if len(names) != 1:
            raise ValueError(f"schedulingProfiles: the data-parallel profile handler needs exactly one scheduling "
                             f"profile, got {len(names)}")

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult | None]) -> Mapping[str, SchedulerProfile]:
        if results or len(profiles) != 1:
            return {}
        return profiles

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        name = next(iter(results), "")
        picked = results.get(name)
        if picked is None or not picked.targets:
            return SchedulingResult(profile_results={name: None} if name else {}, primary_profile=name)
        moved = [self._on_primary_port(e) for e in picked.targets]
        out = SchedulingResult(profile_results={name: ProfileRunResult(moved)}, primary_profile=name)
        out.headers[DATA_PARALLEL_HEADER] = picked.targets[0].hostport
        return out

    def _on_primary_port(self, rank: Endpoint) -> Endpoint:
        primary = self._primary.get(rank)
        if primary is None:
            primary = self._primary[rank] = dataclasses.replace(rank, port=self.primary_port)
            if len(self._primary) > MAX_PRIMARY_ENDPOINTS:
                self._primary.popitem(last=False)
        else:
            self._primary.move_to_end(rank)
        primary.metrics = rank.metrics
        return primary
