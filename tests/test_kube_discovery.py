"""Kubernetes discovery: the real `kubernetes` client against the API stand-in over HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from epp.datalayer.datastore import Datastore
from epp.discovery.kubernetes import KubernetesDiscovery, LeaderElector, required_rbac
from epp.options import Options, parse_args
from tests.kubeapi import KubeApiStandIn, inference_pool, model_rewrite, objective
from tests.servers import eventually

LEGACY = "inference.networking.x-k8s.io"
LLMD = "llm-d.ai"


@pytest.fixture
def kube() -> Iterator[KubeApiStandIn]:
    with KubeApiStandIn() as api:
        yield api


@pytest.fixture
def kubeconfig(kube: KubeApiStandIn, tmp_path) -> str:
    return kube.write_kubeconfig(tmp_path / "kubeconfig")


def pool_options(kubeconfig: str, *extra: str) -> Options:
    return parse_args(["--pool-name=pool", "--pool-namespace=default", f"--kubeconfig={kubeconfig}", *extra])


@pytest.fixture
async def run_discovery() -> AsyncIterator[Callable[[Options], asyncio.Future]]:
    started: list[KubernetesDiscovery] = []

    async def run(options: Options) -> tuple[KubernetesDiscovery, Datastore]:
        ds = Datastore()
        disc = KubernetesDiscovery(ds, options, backoff_base=0.05, backoff_cap=0.5)
        started.append(disc)
        await disc.start()
        return disc, ds

    try:
        yield run
    finally:
        for disc in started:
            await disc.stop()


def hostports(ds: Datastore) -> dict[str, str]:
    return {e.name: e.hostport for e in ds.endpoints()}


async def test_pool_created_after_start(kube, kubeconfig, run_discovery):
    kube.put_pod("vllm-0", "10.0.0.1", {"app": "vllm", "llm-d.ai/role": "decode"})
    kube.put_pod("other-0", "10.0.0.9", {"app": "other"})
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: kube.open_watches("inferencepools") and kube.open_watches("pods"), "watches open")
    assert ds.synced is False and ds.endpoints() == ()
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000, 8001]))
    await eventually(lambda: ds.synced, "synced after the pool appears")
    assert hostports(ds) == {"vllm-0-rank-0": "10.0.0.1:8000", "vllm-0-rank-1": "10.0.0.1:8001"}
    ep = ds.get("vllm-0-rank-1")
    assert ep.labels["llm-d.ai/role"] == "decode" and ep.pod_name == "vllm-0" and ep.namespace == "default"


async def test_selector_change_moves_the_candidate_set(kube, kubeconfig, run_discovery):
    kube.put_pod("a-0", "10.0.0.1", {"app": "a"})
    kube.put_pod("b-0", "10.0.0.2", {"app": "b"})
    kube.apply(inference_pool("pool", {"app": "a"}, [8000]))
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced, "synced")
    assert set(hostports(ds)) == {"a-0-rank-0"}
    kube.apply(inference_pool("pool", {"app": "b"}, [9000]))
    await eventually(lambda: set(hostports(ds)) == {"b-0-rank-0"}, "selector change applied")
    assert hostports(ds) == {"b-0-rank-0": "10.0.0.2:9000"}


async def test_pods_added_not_ready_deleted_and_active_ports(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000, 8001]))
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced, "synced")
    assert ds.endpoints() == ()
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    kube.put_pod("p-1", "10.0.0.2", {"app": "vllm"}, annotations={
        "inference.networking.k8s.io/active-ports": "8001"})
    kube.put_pod("p-noip", "", {"app": "vllm"})
    await eventually(lambda: len(ds.endpoints()) == 3, "pods added")
    assert hostports(ds) == {"p-0-rank-0": "10.0.0.1:8000", "p-0-rank-1": "10.0.0.1:8001",
                             "p-1-rank-1": "10.0.0.2:8001"}
    removed = []
    ds.on_endpoints_removed(lambda eps: removed.extend(e.name for e in eps))
    kube.set_pod_ready("p-0", False)
    await eventually(lambda: "p-0-rank-0" not in hostports(ds), "NotReady pod removed")
    assert set(hostports(ds)) == {"p-1-rank-1"} and sorted(removed) == ["p-0-rank-0", "p-0-rank-1"]
    kube.set_pod_ready("p-0", True)
    await eventually(lambda: len(ds.endpoints()) == 3, "Ready again")
    kube.delete("pods", "p-1")
    await eventually(lambda: "p-1-rank-1" not in hostports(ds), "deleted pod removed")
    assert set(hostports(ds)) == {"p-0-rank-0", "p-0-rank-1"}


async def test_watch_stream_drop_resumes_from_last_resource_version(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    _, ds = await run_discovery(pool_options(kubeconfig))
    # every watch (pool, pods, objectives, rewrites) open before the drop: each follows its own
    # initial list, so the pod watch alone being open does not mean the others are yet
    await eventually(lambda: ds.synced and kube.open_watches("pods") and kube.open_watches() >= 4,
                     "synced and watching")
    watches_before = sum(1 for r, _ in kube.watch_starts if r == "pods")
    with kube.forbidden("watch", "pods"):  # keep the picker out until the changes are made
        assert kube.drop_watches() >= 4
        await eventually(lambda: not kube.open_watches("pods"), "the pod watch dropped")
        kube.put_pod("p-1", "10.0.0.2", {"app": "vllm"})
        kube.set_pod_ready("p-0", False)
    await eventually(lambda: set(hostports(ds)) == {"p-1-rank-0"}, "changes made during the drop")
    assert kube.requests("list", "pods") == 1  # resumed the watch, no re-list
    pod_watches = [rv for r, rv in kube.watch_starts if r == "pods"]
    assert len(pod_watches) > watches_before and pod_watches[-1] != "0"


async def test_410_gone_is_answered_by_a_relist(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    kube.put_pod("p-1", "10.0.0.2", {"app": "vllm"})
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and len(ds.endpoints()) == 2 and kube.open_watches("pods"), "synced")
    # While the picker is disconnected a pod goes and history is compacted: the resumed
    # watch gets HTTP 410, and the deletion is only visible through a fresh list.
    with kube.forbidden("watch", "pods"):
        kube.drop_watches()
        await eventually(lambda: not kube.open_watches("pods"), "the pod watch dropped")
        kube.delete("pods", "p-0")
        kube.compact()
    await eventually(lambda: set(hostports(ds)) == {"p-1-rank-0"}, "re-list after 410")
    assert kube.requests("list", "pods") == 2
    # An in-stream ERROR 410 event also leads to a re-list.
    await eventually(lambda: kube.open_watches("pods"), "watching again")
    kube.expire_watches()
    kube.put_pod("p-2", "10.0.0.3", {"app": "vllm"})
    await eventually(lambda: set(hostports(ds)) == {"p-1-rank-0", "p-2-rank-0"}, "re-list after ERROR 410")
    assert kube.requests("list", "pods") == 3


async def test_403_is_logged_with_the_missing_permission_and_retried(kube, kubeconfig, run_discovery, caplog):
    caplog.set_level(logging.INFO, logger="epp.discovery")
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    kube.forbid("list", "pods")
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: kube.requests("list", "pods") >= 3, "retries of the forbidden list")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("may not list pods in namespace default" in m and "verbs [list]" in m for m in lines), lines
    assert not ds.synced
    kube.allow("list", "pods")
    await eventually(lambda: ds.synced and len(ds.endpoints()) == 1, "synced once permitted")


async def test_api_server_errors_and_bad_token_are_retried(kube, kubeconfig, run_discovery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="epp.discovery")
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    kube.fail_next(3, 500)
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and len(ds.endpoints()) == 1, "synced despite 500s")
    bad = kube.write_kubeconfig(tmp_path / "bad", token="wrong")
    _, ds2 = await run_discovery(pool_options(bad))
    await eventually(lambda: any("unauthorized" in r.getMessage() for r in caplog.records), "401 logged")
    assert not ds2.synced


async def test_rewrites_and_objectives_at_run_time(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.apply(objective("critical", "pool", priority=10))
    kube.apply(objective("elsewhere", "other-pool", priority=5))
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and "critical" in ds.objectives, "synced with objectives")
    assert ds.objectives["critical"].priority == 10 and "elsewhere" not in ds.objectives
    assert ds.rewrite_model("food-review") is None
    kube.apply(model_rewrite("food", "pool", [{"matches": [{"model": {"type": "Exact", "value": "food-review"}}],
                                               "targets": [{"modelRewrite": "food-review-v2", "weight": 1}]}]))
    kube.apply(model_rewrite("not-mine", "other-pool", [{"targets": [{"modelRewrite": "x"}]}]))
    await eventually(lambda: ds.rewrite_model("food-review") == "food-review-v2", "rewrite applied")
    assert ds.rewrite_model("other-model") is None  # the other pool's catch-all is ignored
    kube.apply(objective("critical", "pool", priority=-1))
    await eventually(lambda: ds.objectives["critical"].priority == -1, "objective updated")
    kube.delete("inferencemodelrewrites", "food", group=LEGACY)
    kube.delete("inferenceobjectives", "critical", group=LEGACY)
    await eventually(lambda: ds.rewrite_model("food-review") is None and not ds.objectives, "removals")


async def test_pool_deleted_unsyncs_and_clears(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    _, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and len(ds.endpoints()) == 1, "synced")
    kube.delete("inferencepools", "pool", group="inference.networking.k8s.io")
    await eventually(lambda: not ds.synced and ds.endpoints() == (), "pool deletion")


async def test_standalone_endpoint_selector(kube, kubeconfig, run_discovery):
    kube.put_pod("d-0", "10.0.0.1", {"app": "vllm", "role": "decode"})
    kube.put_pod("p-0", "10.0.0.2", {"app": "vllm", "role": "prefill"})
    kube.put_pod("x-0", "10.0.0.3", {"app": "other", "role": "decode"})
    options = parse_args(["--endpoint-selector=app=vllm,role in (decode, both)", "--endpoint-target-ports=8000,8001",
                          f"--kubeconfig={kubeconfig}"])
    _, ds = await run_discovery(options)
    await eventually(lambda: ds.synced, "synced")
    assert hostports(ds) == {"d-0-rank-0": "10.0.0.1:8000", "d-0-rank-1": "10.0.0.1:8001"}
    assert kube.requests(resource="inferencepools") == 0


async def test_legacy_v1alpha2_pool_and_inference_model(kube, kubeconfig, run_discovery):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000], group=LEGACY))
    kube.put_pod("p-0", "10.0.0.1", {"app": "vllm"})
    kube.apply({"apiVersion": f"{LEGACY}/v1alpha2", "kind": "InferenceModel",
                "metadata": {"name": "food", "namespace": "default"},
                "spec": {"modelName": "food-review", "criticality": "Sheddable",
                         "poolRef": {"name": "pool"}, "targetModels": [{"name": "food-review-v1", "weight": 10}]}})
    _, ds = await run_discovery(pool_options(kubeconfig, f"--pool-group={LEGACY}"))
    await eventually(lambda: ds.synced and "food-review" in ds.objectives, "synced")
    assert hostports(ds) == {"p-0-rank-0": "10.0.0.1:8000"}
    assert ds.objectives["food-review"].priority == -1
    assert ds.rewrite_model("food-review") == "food-review-v1"
    kube.delete("inferencemodels", "food", group=LEGACY)
    await eventually(lambda: not ds.objectives and ds.rewrite_model("food-review") is None, "model removed")


async def test_role_matches_the_calls_the_code_makes(kube, kubeconfig, run_discovery):
    """The API calls of full runs (discovery + leader election), on a cluster with only the
    legacy objective/rewrite CRDs and on one with the llm-d.ai ones, are exactly required_rbac()."""
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    options = pool_options(kubeconfig, "--ha-enable-leader-election")
    for llmd in (False, True):
        if llmd:
            kube.install_llmd_crds()
        disc, ds = await run_discovery(options)
        elector = LeaderElector(options, identity=f"a{llmd}", lease_duration=3, renew_deadline=2, retry_period=0.2)
        await elector.start()
        try:
            await eventually(lambda d=ds, e=elector: d.synced and e.is_leader, "synced and leading")
            for plural in ("inferencepools", "pods", "inferenceobjectives", "inferencemodelrewrites"):
                await eventually(lambda p=plural: kube.open_watches(p), f"{plural} watched")
            if llmd:  # the previous pass's legacy-group watches may still be open: wait for this group's own
                for plural in ("inferenceobjectives", "inferencemodelrewrites"):
                    await eventually(lambda p=plural: ("watch", LLMD, p) in kube.audit, f"llm-d.ai {plural} watched")
            await eventually(lambda: kube.requests("update", "leases") >= 1, "a lease renewal")
        finally:
            await elector.stop()
            await disc.stop()
    used = {(g, r, v) for v, g, r in kube.audit}
    granted = {(rule.group, rule.resource, v) for rule in required_rbac(options) for v in rule.verbs}
    assert used == granted


async def test_bad_selector_and_missing_configuration_are_start_up_errors(tmp_path):
    options = parse_args(["--endpoint-selector=app=a=b", "--endpoint-target-ports=8000"])
    with pytest.raises(ValueError, match="--endpoint-selector: invalid label selector"):
        await KubernetesDiscovery(Datastore(), options).start()
    options = parse_args(["--pool-name=pool", f"--kubeconfig={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="Kubernetes client configuration failed"):
        await KubernetesDiscovery(Datastore(), options).start()


async def test_llmd_group_objectives_and_rewrites_are_preferred_when_installed(kube, kubeconfig, run_discovery,
                                                                              caplog):
    """With both llm-d.ai/v1alpha2 and the legacy group installed, the picker reads the
    llm-d.ai objects only and says it ignores the legacy ones; edits of llm-d.ai objects
    apply at run time."""
    kube.install_llmd_crds()
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.apply(objective("new", "pool", priority=7, group=LLMD))
    kube.apply(objective("old", "pool", priority=3))  # legacy group: ignored
    kube.apply(model_rewrite("rw", "pool", [{"targets": [{"modelRewrite": "from-llmd"}]}], group=LLMD))
    kube.apply(model_rewrite("rw-old", "pool", [{"targets": [{"modelRewrite": "from-legacy"}]}]))
    with caplog.at_level(logging.WARNING, logger="epp.discovery.kubernetes"):
        disc, ds = await run_discovery(pool_options(kubeconfig))
        await eventually(lambda: ds.synced and "new" in ds.objectives and ds.rewrite_model("m"), "llm-d.ai objects")
    assert set(ds.objectives) == {"new"} and ds.objectives["new"].priority == 7
    assert ds.rewrite_model("m") == "from-llmd"
    assert {r.group for r in disc.crd_resources.values()} == {LLMD}
    assert sum("IGNORING legacy resources" in r.getMessage() for r in caplog.records) == 2
    # the watch follows the initial list that synced the datastore: wait for it, not race it
    await eventually(lambda: kube.requests("watch", "inferenceobjectives"), "the llm-d.ai objectives watched")
    assert not any(g == LEGACY and r in ("inferenceobjectives", "inferencemodelrewrites") for _, g, r in kube.audit)
    kube.apply(objective("new", "pool", priority=-2, group=LLMD))
    await eventually(lambda: ds.objectives["new"].priority == -2, "llm-d.ai objective updated")
    kube.delete("inferenceobjectives", "new", group=LLMD)
    await eventually(lambda: not ds.objectives, "llm-d.ai objective deleted")


async def test_legacy_group_only_logs_the_deprecation(kube, kubeconfig, run_discovery, caplog):
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.apply(objective("old", "pool", priority=3))
    with caplog.at_level(logging.WARNING, logger="epp.discovery.kubernetes"):
        disc, ds = await run_discovery(pool_options(kubeconfig))
        await eventually(lambda: ds.synced and "old" in ds.objectives, "legacy objective")
    assert {r.group for r in disc.crd_resources.values()} == {LEGACY}
    deprecations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DEPRECATION")]
    assert len(deprecations) == 2 and all("replacement llm-d.ai/v1alpha2/" in m for m in deprecations)


async def test_only_the_llmd_group_installed(kube, kubeconfig, run_discovery):
    kube.install_llmd_crds(legacy=False)
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.apply(objective("new", "pool", priority=1, group=LLMD))
    disc, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and "new" in ds.objectives, "llm-d.ai objective")
    assert {r.group for r in disc.crd_resources.values()} == {LLMD}


async def test_k8s_notification_source_delivers_object_events(kube, kubeconfig, run_discovery):
    """A k8s-notification-source watching core/v1 ConfigMap in the pool's namespace tells
    its extractor of objects present at start, adds, updates and deletes; a kind the
    server does not serve is a start-up error naming the source."""
    from epp.datalayer.runtime import DataLayer
    from tests.helpers import plugin
    from tests.test_datalayer_sources import Recorder

    def configmap(name: str, data: dict, namespace: str = "default") -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
                "data": data}

    def source(params: dict):
        return plugin("k8s-notification-source", params, where="p", name="cm-events")

    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kube.apply(configmap("first", {"a": "1"}))
    kube.apply(configmap("elsewhere", {"a": "1"}, namespace="other"))
    disc, ds = await run_discovery(pool_options(kubeconfig))
    await eventually(lambda: ds.synced and disc.api is not None, "discovery started")
    rec = Recorder()
    layer = DataLayer(ds)
    layer.bind(source({"version": "v1", "kind": "ConfigMap"}), [rec], "dataLayer.sources[0]")
    layer.check_kubernetes(True)
    await layer.start_notifications(disc.api, disc.namespace)
    try:
        await eventually(lambda: ("upsert", "first") in rec.events, "the object present at start")
        await eventually(lambda: kube.open_watches("configmaps"), "the watch")
        kube.apply(configmap("second", {"b": "2"}))
        kube.apply(configmap("boom", {}))  # an extractor failure is logged; the watch goes on
        kube.apply(configmap("first", {"a": "changed"}))
        kube.delete("configmaps", "second")
        await eventually(lambda: rec.events[-1] == ("delete", "second"), "the delete")
        assert rec.events == [("upsert", "first"), ("upsert", "second"), ("upsert", "boom"), ("upsert", "first"),
                              ("delete", "second")]
        kube.delete("configmaps", "first")
        kube.expire_watches()  # a re-list: objects gone meanwhile are told as deleted
        await eventually(lambda: rec.events[-1] == ("upsert", "boom") and ("delete", "first") in rec.events,
                         "the re-list")
    finally:
        await layer.stop()
    missing = DataLayer(ds)
    missing.bind(source({"group": "example.com", "version": "v1", "kind": "Widget"}), [Recorder()])
    with pytest.raises(ValueError, match=r"k8s-notification-source 'cm-events': the API server does not serve "
                                         r"Widget in example.com/v1"):
        await missing.start_notifications(disc.api, disc.namespace)
