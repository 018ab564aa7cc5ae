"""Parsers from Kubernetes objects to the datastore's terms."""

import pytest

from epp.discovery.kubeobjects import (
    parse_active_ports,
    parse_inference_model,
    parse_pod,
    parse_pool,
    parse_rewrite,
    pod_endpoints,
)
from tests.kubeapi import inference_pool


def test_pool_v1_and_legacy_shapes():
    v1 = parse_pool(inference_pool("p", {"app": "a"}, [8000, 8001]))
    assert v1.match_labels == {"app": "a"} and v1.target_ports == (8000, 8001)
    legacy = parse_pool(inference_pool("p", {"app": "a"}, [9000], group="inference.networking.x-k8s.io"))
    assert legacy.match_labels == {"app": "a"} and legacy.target_ports == (9000,)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("selector"), "spec.selector missing"),
    (lambda s: s.update(targetPorts=[]), "1-8 unique ports"),
    (lambda s: s.update(targetPorts=[{"number": 0}]), "ports 1-65535"),
    (lambda s: s.update(targetPorts=[{"number": 80}, {"number": 80}]), "unique"),
    (lambda s: s["selector"].update(matchLabels={"a": 1}), "map label keys to strings"),
])
def test_bad_pools_name_the_field(mutate, message):
    pool = inference_pool("p", {"app": "a"}, [8000])
    mutate(pool["spec"])
    with pytest.raises(ValueError, match=message):
        parse_pool(pool)


def pod(ready=True, ip="10.0.0.1", deleting=False, annotations=None):
    meta = {"name": "p", "namespace": "ns", "labels": {"app": "a"}, "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"podIP": ip, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}}


def test_pod_endpoints_follow_readiness_ip_deletion_and_active_ports():
    assert [e.name for e in pod_endpoints(parse_pod(pod()), [8000, 8001])] == ["p-rank-0", "p-rank-1"]
    assert pod_endpoints(parse_pod(pod(ready=False)), [8000]) == []
    assert pod_endpoints(parse_pod(pod(ip="")), [8000]) == []
    assert pod_endpoints(parse_pod(pod(deleting=True)), [8000]) == []
    active = parse_pod(pod(annotations={"inference.networking.k8s.io/active-ports": "8001, 9999"}))
    (ep,) = pod_endpoints(active, [8000, 8001])
    assert (ep.name, ep.port, ep.namespace, ep.pod_name) == ("p-rank-1", 8001, "ns", "p")
    assert parse_active_ports("x, 3000,3002") == frozenset({3000, 3002})


def test_rewrite_and_inference_model():
    rw = parse_rewrite({"metadata": {"name": "r", "creationTimestamp": "2026-01-01T00:00:00Z"},
                        "spec": {"rules": [{"matches": [{"model": {"type": "Exact", "value": "a"}}],
                                            "targets": [{"modelRewrite": "b", "weight": 3}, {"modelRewrite": "c"}]},
                                           {"targets": [{"modelRewrite": "d"}]}]}})
    assert rw.rules[0].matches == ("a",) and [t.weight for t in rw.rules[0].targets] == [3, 1]
    assert rw.rules[1].matches == () and rw.creation_timestamp == 1767225600.0
    with pytest.raises(ValueError, match=r"rules\[0\].targets"):
        parse_rewrite({"metadata": {"name": "r"}, "spec": {"rules": [{"targets": [{"modelRewrite": "b",
                                                                                    "weight": 0}]}]}})
    objective, rewrite = parse_inference_model({"metadata": {"name": "m"}, "spec": {
        "modelName": "chat", "criticality": "Critical", "targetModels": [{"name": "chat-v2", "weight": 5}]}})
    assert objective.name == "chat" and objective.priority == 1
    assert rewrite.rules[0].matches == ("chat",) and rewrite.rules[0].targets[0].model_rewrite == "chat-v2"
    with pytest.raises(ValueError, match="criticality"):
        parse_inference_model({"metadata": {"name": "m"}, "spec": {"modelName": "x", "criticality": "Urgent"}})


# --------------------------------------------------------------------------- InferenceObjective / Rewrite groups
def test_crd_group_choice_prefers_llmd_and_says_why():
    from epp.discovery.kubernetes import (
        LLMD_OBJECTIVES,
        LLMD_REWRITES,
        OBJECTIVES,
        REWRITES,
        choose_crd_groups,
    )

    both = {"llm-d.ai/v1alpha2": frozenset({"InferenceObjective", "InferenceModelRewrite"}),
            "inference.networking.x-k8s.io/v1alpha2": frozenset({"InferenceObjective", "InferenceModelRewrite"})}
    chosen, notes = choose_crd_groups(both)
    assert chosen == {"InferenceObjective": LLMD_OBJECTIVES, "InferenceModelRewrite": LLMD_REWRITES}
    assert len(notes) == 2 and all("IGNORING legacy resources" in n for n in notes)
    # Per kind: a cluster that moved only objectives to llm-d.ai.
    mixed = {"llm-d.ai/v1alpha2": frozenset({"InferenceObjective"}),
             "inference.networking.x-k8s.io/v1alpha2": frozenset({"InferenceModelRewrite"})}
    chosen, notes = choose_crd_groups(mixed)
    assert chosen == {"InferenceObjective": LLMD_OBJECTIVES, "InferenceModelRewrite": REWRITES}
    assert notes == ["DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha2/InferenceModelRewrite is "
                     "deprecated, replacement llm-d.ai/v1alpha2/InferenceModelRewrite"]
    # Neither installed: watch the legacy group (a CRD installed later is picked up), saying so.
    chosen, notes = choose_crd_groups({"llm-d.ai/v1alpha2": frozenset(),
                                       "inference.networking.x-k8s.io/v1alpha2": frozenset()})
    assert chosen == {"InferenceObjective": OBJECTIVES, "InferenceModelRewrite": REWRITES}
    assert all("CRD is not installed" in n for n in notes) and len(notes) == 2
    # Discovery failed (None): the legacy group, as before, without claiming anything.
    chosen, notes = choose_crd_groups({"llm-d.ai/v1alpha2": None, "inference.networking.x-k8s.io/v1alpha2": None})
    assert chosen == {"InferenceObjective": OBJECTIVES, "InferenceModelRewrite": REWRITES} and notes == []


def test_the_role_grants_both_objective_groups():
    from epp.discovery.kubernetes import required_rbac
    from epp.options import parse_args

    rules = {(r.group, r.resource) for r in required_rbac(parse_args(["--pool-name=p"]))}
    for group in ("llm-d.ai", "inference.networking.x-k8s.io"):
        assert {(group, "inferenceobjectives"), (group, "inferencemodelrewrites")} <= rules
