"""Kubernetes objects -> the datastore's terms: pools, pods, objectives, rewrites.

Pure functions over the API's JSON (dicts), so they are cheap and unit-testable.
Malformed objects raise ValueError naming the bad field; callers log and skip them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from epp.datalayer.datastore import EndpointSpec, ModelRewrite, Objective, RewriteRule, RewriteTarget
from epp.labelselector import LabelSelector

POOL_GROUP = "inference.networking.k8s.io"
LEGACY_GROUP = "inference.networking.x-k8s.io"
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
CRITICALITY_PRIORITY = {"Critical": 1, "Standard": 0, "Sheddable": -1}


# --------------------------------------------------------------------------- pools
@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    namespace: str
    match_labels: Mapping[str, str]
    target_ports: tuple[int, ...]

    @property
    def selector(self) -> LabelSelector:
        return LabelSelector.from_match_labels(self.match_labels)


def parse_pool(obj: Mapping) -> PoolSpec:
    """InferencePool v1 (`selector.matchLabels`, `targetPorts[].number`) or the legacy
    v1alpha2 shape (`selector` is the label map, `targetPortNumber`)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError("InferencePool: spec missing")
    selector = spec.get("selector")
    if not isinstance(selector, Mapping):
        raise ValueError("InferencePool: spec.selector missing")
    if "targetPortNumber" in spec or "matchLabels" not in selector:
        labels = selector.get("matchLabels", selector) if "matchLabels" in selector else selector
        ports_raw: Sequence = [spec.get("targetPortNumber")]
        field = "spec.targetPortNumber"
    else:
        labels = selector.get("matchLabels")
        ports_raw = [p.get("number") if isinstance(p, Mapping) else None for p in spec.get("targetPorts") or []]
        field = "spec.targetPorts[].number"
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise ValueError("InferencePool: spec.selector.matchLabels must map label keys to strings")
    ports = []
    for p in ports_raw:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
            raise ValueError(f"InferencePool: {field} must be ports 1-65535, got {p!r}")
        ports.append(p)
    if not ports or len(set(ports)) != len(ports):
        raise ValueError(f"InferencePool: {field} must be 1-8 unique ports, got {ports!r}")
    return PoolSpec(meta.get("name", ""), meta.get("namespace", "default"), dict(labels), tuple(ports))


# --------------------------------------------------------------------------- pods
@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    namespace: str
    ip: str
    ready: bool  # Ready condition True, an IP, and not being deleted
    labels: Mapping[str, str]
    active_ports: frozenset[int] | None  # from the active-ports annotation; None = all


def parse_pod(obj: Mapping) -> PodInfo:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    ready_condition = any(c.get("type") == "Ready" and c.get("status") == "True"
                          for c in status.get("conditions") or [])
    ip = status.get("podIP") or ""
    annotations = meta.get("annotations") or {}
    return PodInfo(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", "default"),
        ip=ip,
        ready=ready_condition and bool(ip) and not meta.get("deletionTimestamp"),
        labels=dict(meta.get("labels") or {}),
        active_ports=parse_active_ports(annotations.get(ACTIVE_PORTS_ANNOTATION)),
    )


def parse_active_ports(text: str | None) -> frozenset[int] | None:
    if text is None or not text.strip():
        return None
    ports = set()
    for part in text.split(","):
        part = part.strip()
        if part.isdigit():
            ports.add(int(part))
    return frozenset(ports)


def pod_endpoints(pod: PodInfo, target_ports: Sequence[int]) -> list[EndpointSpec]:
    """One endpoint per target port of a Ready pod, named `<pod>-rank-<i>` by the port's
    index in the pool, limited to the pod's active ports when it announces them."""
    if not pod.ready:
        return []
    return [EndpointSpec(name=f"{pod.name}-rank-{i}", address=pod.ip, port=port, labels=pod.labels,
                         namespace=pod.namespace, pod_name=pod.name)
            for i, port in enumerate(target_ports)
            if pod.active_ports is None or port in pod.active_ports]


# --------------------------------------------------------------------------- objectives and rewrites
def pool_ref_matches(obj: Mapping, pool_name: str, pool_group: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return (ref.get("name") == pool_name and ref.get("group") in (None, "", pool_group)
            and ref.get("kind", "InferencePool") == "InferencePool")


def parse_timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_objective(obj: Mapping) -> Objective:
    meta = obj.get("metadata") or {}
    priority = (obj.get("spec") or {}).get("priority", 0)
    if priority is None:
        priority = 0
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"InferenceObjective {meta.get('name')}: spec.priority must be an integer")
    return Objective(name=meta.get("name", ""), priority=priority, namespace=meta.get("namespace", "default"))


def parse_rewrite(obj: Mapping) -> ModelRewrite:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    rules = []
    for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
        matches = []
        for m in rule.get("matches") or []:
            model = m.get("model") or {}
            if model.get("type", "Exact") != "Exact" or not isinstance(model.get("value"), str):
                raise ValueError(f"InferenceModelRewrite {name}: spec.rules[{i}].matches[].model must be "
                                 "{type: Exact, value: <model>}")
            matches.append(model["value"])
        targets = []
        for t in rule.get("targets") or []:
            weight = t.get("weight", 1)
            if not isinstance(t.get("modelRewrite"), str) or not isinstance(weight, int) or weight < 1:
                raise ValueError(f"InferenceModelRewrite {name}: spec.rules[{i}].targets[] needs modelRewrite "
                                 "and a weight >= 1")
            targets.append(RewriteTarget(t["modelRewrite"], weight))
        rules.append(RewriteRule(tuple(matches), tuple(targets)))
    return ModelRewrite(name=name, rules=tuple(rules), creation_timestamp=parse_timestamp(meta.get("creationTimestamp")),
                        namespace=meta.get("namespace", "default"))


def parse_inference_model(obj: Mapping) -> tuple[Objective, ModelRewrite | None]:
    """Legacy v1alpha2 InferenceModel -> an objective named after the model (criticality
    as priority) and, when it lists targetModels, a rewrite of that model."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    model = spec.get("modelName")
    if not isinstance(model, str) or not model:
        raise ValueError(f"InferenceModel {meta.get('name')}: spec.modelName missing")
    criticality = spec.get("criticality") or "Standard"
    if criticality not in CRITICALITY_PRIORITY:
        raise ValueError(f"InferenceModel {meta.get('name')}: spec.criticality must be Critical|Standard|Sheddable")
    ns = meta.get("namespace", "default")
    objective = Objective(name=model, priority=CRITICALITY_PRIORITY[criticality], namespace=ns)
    targets = tuple(RewriteTarget(t["name"], int(t.get("weight") or 1))
                    for t in spec.get("targetModels") or [] if isinstance(t, Mapping) and t.get("name"))
    rewrite = None
    if targets:
        rewrite = ModelRewrite(name=f"inferencemodel/{meta.get('name')}", rules=(RewriteRule((model,), targets),),
                               creation_timestamp=parse_timestamp(meta.get("creationTimestamp")), namespace=ns)
    return objective, rewrite
