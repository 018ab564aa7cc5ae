"""Kubernetes discovery: one InferencePool (or a pod label selector) and its pods,
plus the pool's InferenceObjectives and InferenceModelRewrites, into the datastore.

Each resource is listed, then watched from the list's resourceVersion on a thread of
its own (see kubeclient.Reflector); every event is applied on the asyncio loop. Pods
of the whole namespace are watched and matched against the pool's selector here, so a
selector change needs no new watch. A pod that is not Ready, has no IP or is being
deleted has no endpoints, so it leaves the candidate set with the event that says so.

`datastore.synced` turns True once the pool and the pods have both been listed (the
picker reports SERVING only then), and False again if the pool is deleted.

InferenceObjective and InferenceModelRewrite are served by two API groups: llm-d.ai/v1alpha2
(current) and inference.networking.x-k8s.io/v1alpha2 (deprecated). As the reference does,
API discovery at start-up picks, per kind, llm-d.ai when the cluster serves it, else the
legacy group (logging a deprecation once); with both installed, the legacy objects are
ignored, with a warning. The Role grants both, since which one a cluster has is only
known at run time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from epp.datalayer.datastore import Datastore, EndpointSpec, ModelRewrite, Objective
from epp.discovery.kubeclient import Backoff, Reflector, Resource, load_api_client, served_kinds
from epp.discovery.kubeobjects import (
    LEGACY_GROUP,
    PodInfo,
    PoolSpec,
    parse_inference_model,
    parse_objective,
    parse_pod,
    parse_pool,
    parse_rewrite,
    pod_endpoints,
    pool_ref_matches,
)
from epp.discovery.leader import LEASE_VERBS, LEASES, LeaderElector
from epp.labelselector import LabelSelector
from epp.options import Options, parse_args

__all__ = ["KubernetesDiscovery", "LeaderElector", "REQUIRED_RBAC", "RbacRule", "required_rbac",
           "watched_resources"]

log = logging.getLogger("epp.discovery.kubernetes")

PODS = Resource("", "v1", "pods")
POOLS = Resource("inference.networking.k8s.io", "v1", "inferencepools")
LEGACY_POOLS = Resource(LEGACY_GROUP, "v1alpha2", "inferencepools")
LLMD_GROUP = "llm-d.ai"
OBJECTIVES = Resource(LEGACY_GROUP, "v1alpha2", "inferenceobjectives")
REWRITES = Resource(LEGACY_GROUP, "v1alpha2", "inferencemodelrewrites")
LLMD_OBJECTIVES = Resource(LLMD_GROUP, "v1alpha2", "inferenceobjectives")
LLMD_REWRITES = Resource(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites")
# kind -> (preferred, legacy) resource
CRD_CANDIDATES: dict[str, tuple[Resource, Resource]] = {
    "InferenceObjective": (LLMD_OBJECTIVES, OBJECTIVES),
    "InferenceModelRewrite": (LLMD_REWRITES, REWRITES),
}
INFERENCE_MODELS = Resource(LEGACY_GROUP, "v1alpha2", "inferencemodels")
WATCH_VERBS = ("list", "watch")  # what a Reflector calls


@dataclass(frozen=True, slots=True)
class RbacRule:
    group: str
    resource: str
    verbs: tuple[str, ...]


def pool_resource(pool_group: str) -> Resource:
    return LEGACY_POOLS if pool_group == LEGACY_GROUP else Resource(pool_group, "v1", "inferencepools")


def watched_resources(options: Options, chosen: Mapping[str, Resource] | None = None) -> list[Resource]:
    """What discovery may watch for these flags: the code below starts these, with one
    resource per kind of CRD_CANDIDATES as `chosen` at start-up (None: every candidate,
    what the Role must grant)."""
    if not options.pool_name:
        return [PODS]  # standalone: --endpoint-selector
    if options.pool_group == LEGACY_GROUP:  # pre-v1 clusters: v1alpha2 pool and InferenceModel
        return [pool_resource(options.pool_group), PODS, INFERENCE_MODELS]
    crds = [r for kind, pair in CRD_CANDIDATES.items() for r in ((chosen[kind],) if chosen else pair)]
    return [pool_resource(options.pool_group), PODS, *crds]


def choose_crd_groups(served: Mapping[str, frozenset[str] | None]) -> tuple[dict[str, Resource], list[str]]:
    """Per kind, the preferred group's resource when its group version serves the kind,
    else the legacy one; with the log lines to write. `served` maps "group/version" to
    the kinds API discovery found there (None: discovery failed, so unknown)."""
    chosen: dict[str, Resource] = {}
    notes: list[str] = []
    for kind, (new, old) in CRD_CANDIDATES.items():
        new_kinds = served.get(f"{new.group}/{new.version}")
        old_kinds = served.get(f"{old.group}/{old.version}")
        if new_kinds and kind in new_kinds:
            chosen[kind] = new
            if old_kinds and kind in old_kinds:
                notes.append(f"Both legacy ({old.group}) and new ({new.group}) {kind} CRDs are installed; "
                             f"using the new group and IGNORING legacy resources")
        else:
            chosen[kind] = old
            if old_kinds and kind in old_kinds:
                notes.append(f"DEPRECATION: apiVersion {old.group}/{old.version}/{kind} is deprecated, "
                             f"replacement {new.group}/{new.version}/{kind}")
            elif new_kinds is not None and old_kinds is not None:
                notes.append(f"{kind} CRD is not installed ({new.group} nor {old.group}); watching "
                             f"{old.group} until it appears")
    return chosen, notes


def required_rbac(options: Options) -> list[RbacRule]:
    """The Role the picker needs for these flags, derived from what it watches and calls."""
    rules = [RbacRule(r.group, r.plural, WATCH_VERBS) for r in watched_resources(options)]
    if options.ha_enable_leader_election:
        rules.append(RbacRule(LEASES.group, LEASES.plural, LEASE_VERBS))
    return rules


def _default_pool_options(leader_election: bool) -> Options:
    return parse_args(["--pool-name=pool", *(["--ha-enable-leader-election"] if leader_election else [])])


# The Role for the default deployment (pool mode, InferencePool v1, leader election on).
REQUIRED_RBAC: tuple[RbacRule, ...] = tuple(required_rbac(_default_pool_options(True)))


def pool_namespace(options: Options) -> str:
    return options.pool_namespace or os.environ.get("NAMESPACE") or "default"


class KubernetesDiscovery:
    def __init__(self, datastore: Datastore, options: Options, *, backoff_base: float = 0.2,
                 backoff_cap: float = 30.0) -> None:
        if not options.pool_name and not options.endpoint_selector:
            raise ValueError("Kubernetes discovery needs --pool-name or --endpoint-selector")
        self.datastore = datastore
        self.options = options
        self.namespace = pool_namespace(options)
        self._backoff = (backoff_base, backoff_cap)
        self._reflectors: list[Reflector] = []
        self._pods: dict[str, PodInfo] = {}
        self._pod_endpoints: dict[str, tuple[str, ...]] = {}
        self._pool: PoolSpec | None = None
        self._listed: set[str] = set()  # resources whose first list has arrived
        self._objectives: dict[str, Objective] = {}
        self._rewrites: dict[str, ModelRewrite] = {}
        self._legacy_models: dict[str, tuple[str, str | None]] = {}  # name -> (objective, rewrite)
        self._selector: LabelSelector | None = None
        self._ports: tuple[int, ...] = ()
        self._api = None
        self.crd_resources: dict[str, Resource] = {}  # kind -> the resource watched (chosen at start-up)

    @property
    def pool(self) -> PoolSpec | None:
        return self._pool

    @property
    def api(self) -> object:
        """The API client, once started (k8s-notification-sources watch through it)."""
        return self._api

    async def start(self) -> None:
        """Start the watches and return; raises ValueError for a bad selector or client
        configuration (the caller reports it as a start-up error)."""
        loop = asyncio.get_running_loop()
        if not self.options.pool_name:
            try:
                self._selector = LabelSelector.parse(self.options.endpoint_selector)
            except ValueError as e:
                raise ValueError(f"--endpoint-selector: {e}") from None
            self._ports = tuple(self.options.endpoint_target_ports)
        api = self._api = await asyncio.to_thread(load_api_client, self.options.kubeconfig)
        handlers: dict[Resource, tuple[Callable, Callable]] = {
            PODS: (self._on_pods_list, self._on_pod_event),
            OBJECTIVES: (self._on_objectives_list, self._on_objective_event),
            REWRITES: (self._on_rewrites_list, self._on_rewrite_event),
            LLMD_OBJECTIVES: (self._on_objectives_list, self._on_objective_event),
            LLMD_REWRITES: (self._on_rewrites_list, self._on_rewrite_event),
            INFERENCE_MODELS: (self._on_models_list, self._on_model_event),
        }
        chosen = None
        if self.options.pool_name and self.options.pool_group != LEGACY_GROUP:
            chosen = self.crd_resources = await asyncio.to_thread(self._choose_crds, api)
        for resource in watched_resources(self.options, chosen):
            if resource.plural == "inferencepools":
                on_list, on_event = self._on_pools_list, self._on_pool_event
                field_selector = f"metadata.name={self.options.pool_name}"
            else:
                (on_list, on_event), field_selector = handlers[resource], None
            self._reflectors.append(Reflector(api, resource, self.namespace, loop, on_list, on_event,
                                              field_selector=field_selector, backoff=Backoff(*self._backoff)))
        for r in self._reflectors:
            r.start()
        where = (f"InferencePool {self.namespace}/{self.options.pool_name}" if self.options.pool_name
                 else f"pods matching {self.options.endpoint_selector!r} in {self.namespace}")
        log.info("Kubernetes discovery started: %s", where)

    @staticmethod
    def _choose_crds(api: object) -> dict[str, Resource]:
        versions = {f"{r.group}/{r.version}" for pair in CRD_CANDIDATES.values() for r in pair}
        served = {gv: served_kinds(api, *gv.split("/")) for gv in sorted(versions)}
        chosen, notes = choose_crd_groups(served)
        for note in notes:
            log.warning("%s", note)
        return chosen

    async def stop(self) -> None:
        for r in self._reflectors:
            r.stop()
        await asyncio.gather(*(asyncio.to_thread(r.join) for r in self._reflectors))
        self._reflectors.clear()
        if self._api is not None:
            self._api.close()
            self._api = None

    # ------------------------------------------------------------------ pool
    def _on_pools_list(self, items: list[dict]) -> None:
        self._listed.add("inferencepools")
        pool = next((o for o in items if o["metadata"]["name"] == self.options.pool_name), None)
        self._set_pool(pool)

    def _on_pool_event(self, etype: str, obj: dict) -> None:
        self._set_pool(None if etype == "DELETED" else obj)

    def _set_pool(self, obj: dict | None) -> None:
        pool = None
        if obj is not None:
            try:
                pool = parse_pool(obj)
            except ValueError as e:
                log.error("%s/%s: %s; serving no endpoints until it is fixed", self.namespace,
                          self.options.pool_name, e)
        if pool is None and self._pool is not None:
            log.warning("InferencePool %s/%s is gone; no endpoints", self.namespace, self.options.pool_name)
        elif pool is None:
            log.info("InferencePool %s/%s not found yet; waiting for it", self.namespace, self.options.pool_name)
        self._pool = pool
        self._selector = pool.selector if pool else None
        self._ports = pool.target_ports if pool else ()
        self._resync_endpoints()

    # ------------------------------------------------------------------ pods
    def _on_pods_list(self, items: list[dict]) -> None:
        self._listed.add("pods")
        self._pods = {}
        for obj in items:
            pod = parse_pod(obj)
            self._pods[pod.name] = pod
        self._resync_endpoints()

    def _on_pod_event(self, etype: str, obj: dict) -> None:
        pod = parse_pod(obj)
        if etype == "DELETED":
            self._pods.pop(pod.name, None)
        else:
            self._pods[pod.name] = pod
        specs = self._endpoints_of(pod) if etype != "DELETED" else []
        wanted = {s.name for s in specs}
        for name in self._pod_endpoints.get(pod.name, ()):
            if name not in wanted:
                self.datastore.remove(name)
        for spec in specs:
            self.datastore.upsert(spec)
        self._remember(pod.name, specs)

    def _endpoints_of(self, pod: PodInfo) -> list[EndpointSpec]:
        if self._selector is None or not self._selector.matches(pod.labels):
            return []
        return pod_endpoints(pod, self._ports)

    def _remember(self, pod_name: str, specs: list[EndpointSpec]) -> None:
        if specs:
            self._pod_endpoints[pod_name] = tuple(s.name for s in specs)
        else:
            self._pod_endpoints.pop(pod_name, None)

    def _resync_endpoints(self) -> None:
        """Recompute every endpoint (after a re-list or a pool change)."""
        self._pod_endpoints = {}
        specs: list[EndpointSpec] = []
        for pod in self._pods.values():
            mine = self._endpoints_of(pod)
            self._remember(pod.name, mine)
            specs.extend(mine)
        self.datastore.replace_all(specs)
        self._update_synced()

    def _update_synced(self) -> None:
        if self.options.pool_name:
            synced = {"inferencepools", "pods"} <= self._listed and self._pool is not None
        else:
            synced = "pods" in self._listed
        if synced != self.datastore.synced:
            log.info("Kubernetes discovery %s: %d endpoints", "synced" if synced else "not synced",
                     len(self.datastore.endpoints()))
        self.datastore.synced = synced

    # ------------------------------------------------------------------ objectives and rewrites
    def _mine(self, obj: dict) -> bool:
        return pool_ref_matches(obj, self.options.pool_name, self.options.pool_group)

    def _on_objectives_list(self, items: list[dict]) -> None:
        self._objectives = {}
        for obj in items:
            self._on_objective_event("ADDED", obj)
        self.datastore.replace_objectives(self._objectives.values())

    def _on_objective_event(self, etype: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        objective = None
        if etype != "DELETED" and self._mine(obj):
            try:
                objective = parse_objective(obj)
            except ValueError as e:
                log.error("%s; ignoring it", e)
        if objective is not None:
            self._objectives[name] = objective
            self.datastore.set_objective(objective)
        elif self._objectives.pop(name, None) is not None:
            self.datastore.remove_objective(name)

    def _on_rewrites_list(self, items: list[dict]) -> None:
        self._rewrites = {}
        for obj in items:
            rewrite = self._parse_rewrite(obj)
            if rewrite is not None:
                self._rewrites[rewrite.name] = rewrite
        self.datastore.replace_rewrites(self._rewrites.values())

    def _on_rewrite_event(self, etype: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        rewrite = self._parse_rewrite(obj) if etype != "DELETED" else None
        if rewrite is not None:
            self._rewrites[name] = rewrite
            self.datastore.set_rewrite(rewrite)
        elif self._rewrites.pop(name, None) is not None:
            self.datastore.remove_rewrite(name)

    def _parse_rewrite(self, obj: dict) -> ModelRewrite | None:
        if not self._mine(obj):
            return None
        try:
            return parse_rewrite(obj)
        except ValueError as e:
            log.error("%s; ignoring it", e)
            return None

    # Legacy InferenceModel: keyed by object name, feeding an objective and a rewrite.
    def _on_models_list(self, items: list[dict]) -> None:
        for name in list(self._legacy_models):
            self._drop_model(name)
        for obj in items:
            self._on_model_event("ADDED", obj)

    def _drop_model(self, name: str) -> None:
        entry = self._legacy_models.pop(name, None)
        if entry is None:
            return
        objective_name, rewrite_name = entry
        self.datastore.remove_objective(objective_name)
        if rewrite_name:
            self.datastore.remove_rewrite(rewrite_name)

    def _on_model_event(self, etype: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        self._drop_model(name)
        if etype == "DELETED" or not self._mine(obj):
            return
        try:
            objective, rewrite = parse_inference_model(obj)
        except ValueError as e:
            log.error("%s; ignoring it", e)
            return
        self.datastore.set_objective(objective)
        if rewrite is not None:
            self.datastore.set_rewrite(rewrite)
        self._legacy_models[name] = (objective.name, rewrite.name if rewrite else None)
