"""data-parallel-profile-handler (reference pkg/epp/framework/plugins/scheduling/
profilehandler/dataparallel/dp_profile_handler.go): one profile picks a data-parallel
rank's endpoint; the request goes to the same pod's primary port, and the rank's
host:port rides along in `x-data-parallel-host-port` for the pod's routing sidecar.
The reference deprecates it (a single-profile handler with Istio >= 1.28.1 does the same).

The reference re-addresses clones of the picked endpoints to the primary port; their
identity (the endpoint's name) stays the rank's, so its in-flight counts and prefix index
follow the rank. Here the result keeps the rank's own endpoints as targets and asks for the
primary port as the destination (SchedulingResult.destination_port), which has that effect."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import (
    ConfiguredPlugin,
    CycleState,
    EveryProfileOnce,
    InferenceRequest,
    PluginHandle,
    ProfileRunResult,
    SchedulingResult,
    bounded,
)
from epp.framework.types import DATA_PARALLEL_HEADER

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DataParallelParams:
    primaryPort: int = bounded(8000, ge=0, le=65535)  # the reference: 0 is accepted as is


class DataParallelProfileHandler(EveryProfileOnce, ConfiguredPlugin[DataParallelParams]):
    """Exactly one scheduling profile; its picks are sent to their pod's primary port."""

    type_name = "data-parallel-profile-handler"
    Params = DataParallelParams

    def configure(self, p: DataParallelParams, handle: PluginHandle) -> None:
        log.info("data-parallel-profile-handler %r is deprecated in the reference: use single-profile-handler "
                 "with Istio >= 1.28.1", self.name)

    def check_profiles(self, names: Sequence[str]) -> None:
        if len(names) != 1:
            raise ValueError(f"schedulingProfiles: the data-parallel profile handler needs exactly one scheduling "
                             f"profile, got {len(names)}")

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileRunResult | None]) -> SchedulingResult:
        name = next(iter(results), "")
        picked = results.get(name)
        if picked is None or not picked.targets:
            return SchedulingResult(profile_results={name: None} if name else {}, primary_profile=name)
        out = SchedulingResult(profile_results={name: picked}, primary_profile=name,
                               destination_port=self.params.primaryPort)
        out.headers[DATA_PARALLEL_HEADER] = picked.targets[0].hostport
        return out
