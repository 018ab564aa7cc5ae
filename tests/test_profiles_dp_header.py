"""data-parallel-profile-handler and header-profile-handler against the reference
(llm-d/llm-d-router pkg/epp/framework/plugins/scheduling/profilehandler/dataparallel/
dp_profile_handler.go, headerprofile/header_profile_handler.go)."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from epp.assembly import load_plugin_set
from epp.config import ConfigError
from epp.errors import InferenceError
from epp.framework import Endpoint, InferenceRequest, Metrics, PluginHandle
from epp.scheduling.scheduler import SchedulingTrace


def ep(i, port=8001, address=None, queue=0):
    return Endpoint(f"e{i}", address or f"10.0.0.{i}", port,
                    metrics=Metrics(waiting_queue_size=queue, update_time=time.monotonic(), ok=True))


def req(headers=None):
    return InferenceRequest("r1", "m", "m", "completions", "hello", headers or {})


def handle():
    return PluginHandle(rng=random.Random(1))


DP = """
plugins:
- {type: data-parallel-profile-handler, parameters: PARAMS}
- {type: queue-scorer}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: queue-scorer}]}
"""


# --------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("params, port", [("{}", 8000), ("{primaryPort: 9000}", 9000)])  # reference default 8000
def test_data_parallel_routes_to_the_primary_port_and_names_the_rank(params, port):
    p = load_plugin_set(DP.replace("PARAMS", params), handle())
    ranks = [ep(1, 8003, queue=5), ep(1, 8005, queue=0)]  # two rank ports of one pod
    _, result = p.run_cycle(req(), ranks)
    assert result.headers == {"x-data-parallel-host-port": "10.0.0.1:8005"}  # the picked rank
    assert result.destination() == f"10.0.0.1:{port}"
    assert result.targets == [ranks[1]] and ranks[1].port == 8005  # the rank itself, unchanged


def test_data_parallel_ipv6_rank_is_bracketed():
    p = load_plugin_set(DP.replace("PARAMS", "{}"), handle())
    _, result = p.run_cycle(req(), [ep(1, 8002, address="fd00::1")])
    assert result.headers == {"x-data-parallel-host-port": "[fd00::1]:8002"}
    assert result.destination() == "[fd00::1]:8000"


DP_PREFIX = """
plugins:
- {type: data-parallel-profile-handler, parameters: {primaryPort: 8000}}
- {type: prefix-cache-scorer}
- {type: active-request-scorer}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: prefix-cache-scorer, weight: 5}, {pluginRef: active-request-scorer}]}
"""


async def test_in_flight_and_the_prefix_index_follow_the_rank_not_the_primary_port():
    from epp.datalayer.datastore import Datastore, EndpointSpec
    from epp.requestcontrol.director import Director
    from tests.test_director import OpenGate, finish, headers

    ds = Datastore()
    for port in (8000, 8001, 8002, 8003):  # one pod, four rank ports; 8000 is also the primary
        ds.upsert(EndpointSpec(name=f"pod-rank-{port - 8000}", address="10.0.0.1", port=port))
    plugins = load_plugin_set(DP_PREFIX, handle())
    load = plugins.plugins["inflight-load-producer"]
    director = Director(ds, plugins, admission=OpenGate())
    prompt = orjson.dumps({"model": "m", "prompt": "a long shared prefix " * 100, "max_tokens": 2})
    ctx = director.new_context(headers())
    await director.route(ctx, prompt, None)
    rank = ctx.targets[0]
    assert any(rank is e for e in ds.endpoints())  # the pool's own rank endpoint, not a copy
    assert ctx.destination == "10.0.0.1:8000" and ctx.upstream_headers["x-data-parallel-host-port"] == rank.hostport
    assert rank.in_flight == 1 and load.requests == {rank: 1}  # counted on the rank's own endpoint
    finish(director, ctx)
    assert rank.in_flight == 0 and not load.requests
    for _ in range(5):  # the prefix was recorded on the rank: the same prompt returns there
        again = director.new_context(headers())
        await director.route(again, prompt, None)
        assert again.targets == [rank]
        finish(director, again)


def test_data_parallel_needs_exactly_one_profile():
    text = DP.replace("PARAMS", "{}") + "- {name: other, plugins: [{pluginRef: queue-scorer}]}\n"
    with pytest.raises(ConfigError, match="needs exactly one scheduling profile, got 2"):
        load_plugin_set(text, handle())


# --------------------------------------------------------------------------- header profile
HEADER = """
plugins:
- {type: header-profile-handler, parameters: PARAMS}
- {type: queue-scorer}
- {name: only-e1, type: label-selector-filter, parameters: {matchLabels: {n: e1}}}
- {name: only-e2, type: label-selector-filter, parameters: {matchLabels: {n: e2}}}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: only-e1}, {pluginRef: queue-scorer}]}
- {name: prefill, plugins: [{pluginRef: only-e2}, {pluginRef: queue-scorer}]}
"""


def labelled():
    a, b = ep(1), ep(2)
    a.labels, b.labels = {"n": "e1"}, {"n": "e2"}
    return [a, b]


def pick(text, headers):
    p = load_plugin_set(text, handle())
    trace = SchedulingTrace()
    _, result = p.run_cycle(req(headers), labelled(), trace=trace)
    return result.targets[0].name, [t.name for t in trace.profiles]


@pytest.mark.parametrize("headers, expected", [
    ({"epp-profile": "prefill"}, "e2"),  # the header names the profile (keys arrive lowercased)
    ({"epp-profile": "  prefill "}, "e2"),  # trimmed
    ({}, "e1"),  # missing: defaultProfile decode
    ({"epp-profile": "   "}, "e1"),  # blank: the default too
])
def test_header_profile_selection(headers, expected):
    name, ran = pick(HEADER.replace("PARAMS", "{}"), headers)
    assert name == expected and len(ran) == 1


def test_header_profile_custom_header_and_default():
    text = HEADER.replace("PARAMS", "{headerName: ' X-Stage ', defaultProfile: prefill}")
    assert pick(text, {"x-stage": "decode"})[0] == "e1"
    assert pick(text, {"epp-profile": "decode"})[0] == "e2"  # not the header it reads: the default


def test_header_profile_unknown_value_fails_the_request():
    p = load_plugin_set(HEADER.replace("PARAMS", "{}"), handle())
    with pytest.raises(InferenceError) as e:
        p.run_cycle(req({"epp-profile": "nope"}), labelled())
    assert e.value.code == "ResourceExhausted"  # as the reference: no profile picked, a generic 429


def test_header_profile_single_profile_always_runs():
    text = HEADER.replace("PARAMS", "{}").replace(
        "- {name: prefill, plugins: [{pluginRef: only-e2}, {pluginRef: queue-scorer}]}\n", "")
    assert pick(text, {"epp-profile": "whatever"})[0] == "e1"


def test_header_profile_handler_is_alpha():
    text = HEADER.replace("PARAMS", "{}")
    with pytest.raises(ConfigError, match="has Alpha stability level"):
        load_plugin_set(text, handle(), allow_experimental_plugins=False)
