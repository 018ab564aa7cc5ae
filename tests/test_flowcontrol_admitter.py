"""probabilistic-admitter against the reference's formula and defaults
(llm-d-router pkg/epp/framework/plugins/requestcontrol/admitter/probabilisticadmitter/plugin.go)
and the director's answer to an Admit denial (pkg/epp/requestcontrol/director.go,
runAdmissionPlugins: Internal, "request cannot be admitted: ...")."""

import random
import time

import pytest

from epp.assembly import load_plugin_set
from epp.errors import InferenceError
from epp.flowcontrol.admitter import ProbabilisticAdmitter, ProbabilisticAdmitterParams
from epp.framework import CycleState, Endpoint, InferenceRequest, Metrics, PluginHandle


def ep(name, queue=0, kv=0.0):
    e = Endpoint(name, f"10.0.0.{len(name)}", 8000)
    e.metrics = Metrics(waiting_queue_size=queue, kv_cache_usage_percent=kv, update_time=time.monotonic(), ok=True)
    return e


def req(priority):
    return InferenceRequest("r", "m", "m", "completions", "x", {}, priority=priority)


class FixedRng:
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def admitter(rng_value=0.5, **params):
    return ProbabilisticAdmitter("pa", ProbabilisticAdmitterParams(**params), PluginHandle(rng=FixedRng(rng_value)))


def test_defaults_are_the_references():
    p = ProbabilisticAdmitterParams()
    assert (p.queueDepthThreshold, p.kvCacheUtilThreshold, p.power, p.k) == (5, 0.8, 5.0, 300.0)


def test_probability_is_saturation_to_the_power_times_k_capped_at_one():
    a = admitter()
    pool = [ep("a", queue=1), ep("bb", kv=0.16)]  # max(1/5, 0) and max(0, 0.16/0.8): mean 0.2
    assert a.pool_saturation(pool) == pytest.approx(0.2)
    assert a.reject_probability(pool) == pytest.approx(0.2 ** 5 * 300)  # 0.096
    assert a.reject_probability([ep("a", queue=5)]) == 1.0  # 1^5 x 300, capped


def test_only_sheddable_requests_with_candidates_are_shed():
    cycle, hot = CycleState(), [ep("a", queue=50)]
    assert admitter(0.99).admit_request(cycle, req(0), hot) is None  # priority >= 0: always admitted
    assert admitter(0.99).admit_request(cycle, req(-1), []) is None  # no candidates: admitted
    reason = admitter(0.99).admit_request(cycle, req(-1), hot)
    assert reason == "probabilistic-admitter: rejected, saturation=10.000 prob=1.00"
    cool = [ep("a", queue=1), ep("bb", kv=0.16)]  # p = 0.096
    assert admitter(0.05).admit_request(cycle, req(-1), cool) is not None  # 0.05 < 0.096
    assert admitter(0.10).admit_request(cycle, req(-1), cool) is None


# the reference's deploy/config/probabilistic-admitter-epp-config.yaml, unchanged
REFERENCE_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: probabilistic-admitter
- type: random-picker  # feel free to plug in other scorers/pickers here
- type: utilization-detector
  parameters:
    queueDepthThreshold: 999999999
    kvCacheUtilThreshold: 1.0
flowControl:
  saturationDetector:
    pluginRef: utilization-detector
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""


def test_the_references_deploy_config_sheds_sheddable_requests_with_500():
    p = load_plugin_set(REFERENCE_CONFIG, PluginHandle(rng=random.Random(7)))
    hot, cool = [ep("a", queue=10)], [ep("a")]
    with pytest.raises(InferenceError) as e:
        p.run_cycle(req(-1), hot)
    assert e.value.http_status == 500 and e.value.message.startswith(
        "request cannot be admitted: probabilistic-admitter: rejected")
    assert p.run_cycle(req(0), hot)[1].targets  # not sheddable: scheduled
    assert p.run_cycle(req(-1), cool)[1].targets  # idle pool: p = 0
    assert p.run_cycle(req(-1), hot, commit=False)[1].targets  # explain (no commit) never sheds
