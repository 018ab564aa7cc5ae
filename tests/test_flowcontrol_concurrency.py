"""concurrency-detector against the reference's formulas and defaults
(llm-d-router pkg/epp/framework/plugins/flowcontrol/saturationdetector/concurrency/{config,detector}.go)."""

import random

import pytest

from epp.assembly import load_plugin_set
from epp.config import load_config
from epp.flowcontrol.concurrency import ConcurrencyDetector, ConcurrencyParams
from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import INFLIGHT_LOAD, InFlightLoadInfo


class Producer:
    def __init__(self, requests, tokens):
        self.requests, self.tokens = requests, tokens


E1, E2 = Endpoint("e1", "10.0.0.1", 8000), Endpoint("e2", "10.0.0.2", 8000)


def detector(producer=None, **params):
    plugins = {"inflight-load-producer": producer} if producer is not None else {}
    return ConcurrencyDetector("cd", ConcurrencyParams(**params), PluginHandle(plugins=plugins))


def test_defaults_are_the_references():
    p = ConcurrencyParams()
    assert (p.concurrencyMode, p.maxConcurrency, p.maxTokenConcurrency, p.headroom, p.inFlightLoadProducerName) == (
        "requests", 100, 1_000_000, 0.0, "")


def test_saturation_per_mode():
    prod = Producer({E1: 3, E2: 1}, {E1: 500, E2: 100})
    assert detector(prod, maxConcurrency=4).saturation([E1, E2]) == 4 / 8  # sum in flight / sum capacity
    assert detector(prod, concurrencyMode="tokens", maxTokenConcurrency=1000).saturation([E1, E2]) == 600 / 2000
    hybrid = detector(prod, concurrencyMode="hybrid", maxConcurrency=4, maxTokenConcurrency=1000)
    assert hybrid.saturation([E1, E2]) == pytest.approx((max(3 / 4, 0.5) + max(1 / 4, 0.1)) / 2)
    assert detector(prod).saturation([]) == 1.0  # no endpoints: saturated
    assert detector(None).saturation([E1]) == 0.0  # nothing counted yet


def test_filter_keeps_endpoints_under_limit_times_headroom_and_may_return_none():
    cycle = CycleState()
    cycle.write(INFLIGHT_LOAD, InFlightLoadInfo({E1: 2, E2: 3}, {}, {}))
    req = InferenceRequest("r", "m", "m", "completions", "x", {})
    assert detector(maxConcurrency=3).filter(cycle, req, [E1, E2]) == [E1]
    assert detector(maxConcurrency=2, headroom=0.5).filter(cycle, req, [E1, E2]) == [E1]  # limit int(3)
    assert detector(maxConcurrency=2).filter(cycle, req, [E1, E2]) == []


def test_as_the_configured_detector_it_counts_what_the_producer_charges():
    text = ("featureGates: [flowControl]\nplugins:\n- {type: concurrency-detector, parameters: {maxConcurrency: 2}}\n"
            "- {type: queue-scorer}\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]\n"
            "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}\n")
    cfg = load_config(text)
    assert cfg.saturation_detector == "concurrency-detector"
    assert cfg.plugin("inflight-load-producer").implicit  # the producer it reads is added
    p = load_plugin_set(text, PluginHandle(rng=random.Random(1)))
    det = p.saturation_detector
    assert det.saturation([E1]) == 0.0
    req = InferenceRequest("r1", "m", "m", "completions", "hello", {})
    p.run_cycle(req, [E1])  # PreRequest charges the picked endpoint
    assert det.saturation([E1]) == 0.5
