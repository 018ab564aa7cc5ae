"""precise-prefix-cache-producer: parameters and defaults as the reference's
(requestcontrol/dataproducer/preciseprefixcache producer.go, prerequest.go; llm-d-kv-cache
kvblock.DefaultTokenProcessorConfig, kvcache.NewDefaultConfig / DefaultKVCacheBackendConfig,
kvevents.DefaultConfig), the longest-prefix score weighted by medium, speculative entries,
the fallback to the approximate guess, the deprecated precise-prefix-cache-scorer, and the
in-process feed the cluster simulation uses."""

import pytest

from epp.config import load_config
from epp.datalayer.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
from epp.framework import CycleState, InferenceRequest
from epp.framework.datakeys import PREFIX_MATCH_INFO, TOKEN_IDS
from epp.framework.registry import BUILTINS, FUTURE, stability
from tests.helpers import ep, plugin, plugin_set_error, result

BS = 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def producer(params=None, clock=None, ptype="precise-prefix-cache-producer"):
    return plugin(ptype, params or {"tokenProcessorConfig": {"blockSize": BS}}, clock=clock, where="t")


def req(prompt="x", model="m", body=None):
    return InferenceRequest("r", model, model, "completions", prompt, {}, body=body or {})


def stored(tokens, hashes, parent=None, medium="GPU", lora=None):
    return BlockStored(tuple(hashes), parent, tuple(tokens), BS, None, medium, lora)


def run(p, tokens, endpoints, request=None):
    cycle = CycleState()
    if tokens is not None:
        cycle.write(TOKEN_IDS, tuple(tokens))
    p.prepare_request_data(cycle, request or req(), endpoints)
    return cycle, cycle.read(PREFIX_MATCH_INFO.of(p.name))


PROMPT = list(range(1000, 1000 + 4 * BS))  # 4 blocks


def test_registered_beta_and_no_longer_future():
    for t in ("precise-prefix-cache-producer", "precise-prefix-cache-scorer"):
        assert t in BUILTINS and t not in FUTURE and stability(t) == "Beta"


def test_defaults_are_the_references():
    p = plugin("precise-prefix-cache-producer", None, where="t")
    params = p.params
    assert p.block_size == 16 and p.keyer.hash_seed == ""  # kvblock.DefaultTokenProcessorConfig
    k = params.kvEventsConfig
    assert (k.topicFilter, k.concurrency, k.discoverPods, k.engineType, k.zmqEndpoint) == ("kv@", 4, True, "vllm", "")
    assert k.podDiscoveryConfig.socketPort == 5557 and k.podDiscoveryConfig.replaySocketPort == 0
    assert params.speculativeIndexing is False and params.speculative_ttl() == 2.0
    assert params.indexerConfig.medium_weights() == {"gpu": 1.0, "cpu": 0.8}
    assert p.index.max_blocks == 2_000_000  # the reference's 1e8 keys is ~20 GB here: bounded lower
    assert p.index.speculative_ttl == 2.0


def test_parameters_map_onto_the_index_and_keys():
    p = producer({"tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"},
                  "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": True, "metricsLoggingInterval": 60000000000,
                                                           "inMemoryConfig": {"size": 5000}},
                                    "kvCacheBackendConfigs": [{"name": "gpu", "weight": 1.0},
                                                              {"name": "cpu", "weight": 0.5}]},
                  "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 6000}},
                  "speculativeIndexing": True, "speculativeTTL": "500ms"})
    assert (p.block_size, p.keyer.hash_seed, p.index.max_blocks, p.index.speculative_ttl) == (64, "42", 5000, 0.5)
    assert p.params.kvEventsConfig.podDiscoveryConfig.socketPort == 6000
    assert p.params.kvEventsConfig.topicFilter == "kv@"  # nested defaults kept, as Go's json decode
    assert producer({"tokenProcessorConfig": {"blockSizeTokens": 32, "blockSize": 64}}).block_size == 32
    assert producer({"speculativeTTL": "0s"}).params.speculative_ttl() == 2.0  # <= 0: the default


@pytest.mark.parametrize("params, needle", [
    ({"indexerConfig": {"tokenizersPoolConfig": {}}}, "tokenizersPoolConfig: not supported; configure a token-producer"),
    ({"indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": "x"}}}}, "redisConfig: only the in-memory"),
    ({"kvEventsConfig": {"engineType": "sglang"}}, "engineType: only vllm"),
    ({"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 70000}}}, "socketPort"),
    ({"kvEventsConfig": {"topicFilter": 3}}, "topicFilter: expected a string"),
    ({"speculativeTTL": "soon"}, "speculativeTTL"),
    ({"kvEventsConfig": {"zmqEndpoint": "localhost:5557"}}, "zmqEndpoint: expected tcp://"),
    ({"tokenProcessorConfig": {"blockSize": -1}}, "blockSize"),
])
def test_bad_parameters_name_their_key(params, needle):
    text = ("plugins:\n- type: precise-prefix-cache-producer\n  parameters: " + repr(params).replace("'", '"')
            + "\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n"
              "  - pluginRef: max-score-picker\n")
    assert needle in plugin_set_error(text)


def test_longest_prefix_weighted_by_medium_and_truncated():
    a, b, c = ep(1), ep(2), ep(3)
    p = producer()
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    p.feed(b.name, [stored(PROMPT[:3 * BS], [21, 22, 23], medium="CPU")], "m")
    p.feed(c.name, [stored(PROMPT[BS:2 * BS], [31])], "m")  # not the prompt's first block: no prefix
    _, m = run(p, PROMPT, [a, b, c])
    assert (m.total_blocks, m.block_size_tokens) == (4, BS)
    assert m.matches == {a: 4, b: 2}  # b: int(3 x 0.8); c holds a later block only
    assert m.longest == 4
    assert m.by_medium == {a: {"gpu": 4}, b: {"cpu": 3}}  # what Explain shows
    assert p.endpoint_status(a) == {"kv-events": "precise", "kv-events-lag": "0.000s"}


def test_events_remove_and_clear():
    a = ep(1)
    p = producer()
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    p.feed(a.name, [BlockRemoved((13,), "GPU")])
    assert run(p, PROMPT, [a])[1].matches == {a: 2}
    p.feed(a.name, [AllBlocksCleared()])
    assert run(p, PROMPT, [a])[1].matches == {}


def test_lora_keys_are_apart_from_the_base_model():
    a = ep(1)
    p = producer()
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14], lora="sql-lora")], "m")
    assert run(p, PROMPT, [a])[1].matches == {}
    assert run(p, PROMPT, [a], req(model="sql-lora"))[1].matches == {a: 4}


def test_client_token_ids_serve_when_no_tokenizer_published_them():
    a = ep(1)
    p = producer()
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    assert run(p, None, [a], req(body={"prompt": PROMPT}))[1].matches == {a: 4}


def test_client_token_ids_reach_it_through_the_default_token_producer():
    """The implicit token-producer (estimate backend) publishes the client's ids, an
    embeddings input too, under TOKEN_IDS; the producer reads them from there."""
    ps = plugin_set("\n- type: precise-prefix-cache-producer\n  parameters: {tokenProcessorConfig: {blockSize: 16}}\n",
                    "precise-prefix-cache-producer")
    tokens, prod = ps.plugins["token-producer"], ps.plugins["precise-prefix-cache-producer"]
    a = ep(1)
    prod.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    cycle, request = CycleState(), InferenceRequest("r", "m", "m", "embeddings", "x", {}, body={"input": PROMPT})
    for p in (tokens, prod):
        p.prepare_request_data(cycle, request, [a])
    assert cycle.read(TOKEN_IDS) == tuple(PROMPT) and cycle.read(prod.key).matches == {a: 4}


def test_speculative_entries_until_ttl_and_prefill_profile_too():
    clock = Clock()
    a, b, pf = ep(1), ep(2), ep(3)
    p = producer({"tokenProcessorConfig": {"blockSize": BS}, "speculativeIndexing": True, "speculativeTTL": "2s"},
                 clock=clock)
    p.feed(a.name, [])
    p.feed(b.name, [])
    p.feed(pf.name, [])
    cycle, m = run(p, PROMPT, [a, b, pf])
    assert m.matches == {}
    p.pre_request(cycle, req(), result(b, prefill=pf))
    assert run(p, PROMPT, [a, b, pf])[1].matches == {b: 4, pf: 4}
    clock.now += 2.5
    assert run(p, PROMPT, [a, b, pf])[1].matches == {}


def test_no_speculation_by_default():
    a = ep(1)
    p = producer()
    p.feed(a.name, [])
    cycle, _ = run(p, PROMPT, [a])
    p.pre_request(cycle, req(), result(a))
    assert run(p, PROMPT, [a])[1].matches == {}


def test_fallback_to_the_approximate_guess():
    a, b = ep(1), ep(2)
    p = producer()
    text = "t" * (BS * 4 * 4)  # 4 approximate blocks of 16 tokens x 4 characters
    request = req(prompt=text)
    p.feed(a.name, [])  # a is precise and holds nothing
    cycle, m = run(p, PROMPT, [a, b], request)
    assert m.matches == {}
    p.pre_request(cycle, request, result(b))  # routed to b: the approximate index records it
    p.pre_request(run(p, PROMPT, [a, b], request)[0], request, result(a))
    # b has no event stream: its guess (4 of 4 blocks) scaled to the precise 4 blocks; a is precise: 0
    m = run(p, PROMPT, [a, b], request)[1]
    assert (m.matches, m.by_medium) == ({b: 4}, {b: {"approximate": 4}})
    assert p.endpoint_status(b) == {"kv-events": "unsubscribed"}
    # no token ids at all: the whole match is the guess
    m = run(p, None, [a, b], request)[1]
    assert (m.matches, m.total_blocks) == ({a: 4, b: 4}, 4)
    # b's server clears its cache (an AllBlocksCleared reached the index, b's stream still
    # not trusted): the guess that b holds the prefix goes too; a's guess stays
    p.index.apply(b.name, [AllBlocksCleared()])
    assert not p.is_precise(b.name)
    assert run(p, None, [a, b], request)[1].matches == {a: 4}
    assert run(p, PROMPT, [a, b], request)[1].matches == {}


def test_endpoint_removal_forgets_its_blocks():
    a = ep(1)
    p = producer()
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    p.endpoints_removed([a])
    assert p.index.blocks_of(a.name) == 0 and not p.is_precise(a.name)


def test_guide_config_wires_scorer_and_extractor():
    from pathlib import Path

    from epp.assembly import load_plugin_set

    text = Path("tests/fixtures/reference/configs/llm-d-precise-prefix-cache.yaml").read_text()
    text = text.replace("    vllm:\n      url: http://localhost:8000\n", "")  # token-producer's backend: another part
    text = text.replace("    modelName: hf-repo/model-name\n", "")
    ps = load_plugin_set(text)
    prod = ps.plugins["precise-prefix-cache-producer"]
    assert prod.block_size == 64
    source, extractors = ps.data_sources[1]
    assert source.type_name == "endpoint-notification-source" and extractors == [prod]
    cfg = load_config(text)
    names = [p.name for p in cfg.plugins]
    assert names.index("token-producer") < names.index("precise-prefix-cache-producer")


def test_deprecated_scorer_alone_produces_and_scores():
    a, b = ep(1), ep(2)
    s = producer(ptype="precise-prefix-cache-scorer")
    s.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    s.feed(b.name, [stored(PROMPT[:2 * BS], [21, 22])], "m")
    cycle, _ = run(s, PROMPT, [a, b])
    assert s.score(cycle, req(), [a, b]) == [1.0, 0.5]


def plugin_set(plugins: str, first: str):
    """A plugin set of `plugins` (YAML list items) and one profile: `first`, max-score-picker."""
    from epp.assembly import load_plugin_set

    return load_plugin_set(f"plugins:{plugins}- type: max-score-picker\nschedulingProfiles:\n- name: default\n"
                           f"  plugins:\n  - pluginRef: {first}\n  - pluginRef: max-score-picker\n")


def test_deprecated_scorer_defers_to_a_configured_producer():
    ps = plugin_set("""
- type: precise-prefix-cache-producer
- type: precise-prefix-cache-scorer
  parameters: {tokenProcessorConfig: {blockSize: 99}}
""", "precise-prefix-cache-scorer")
    prod, scorer = ps.plugins["precise-prefix-cache-producer"], ps.plugins["precise-prefix-cache-scorer"]
    assert scorer.peer is prod and scorer.key == prod.key
    a = ep(1)
    prod.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    cycle, _ = run(prod, PROMPT, [a])
    assert scorer.score(cycle, req(), [a]) == [1.0]


def test_affinity_filter_and_inflight_producer_read_it_by_name():
    """prefix-cache-affinity-filter and inflight-load-producer name the precise producer with
    prefixMatchInfoProducerName (the config loader orders it before the in-flight producer)."""
    from epp.framework.datakeys import INFLIGHT_LOAD

    ps = plugin_set("""
- type: precise-prefix-cache-producer
  parameters: {tokenProcessorConfig: {blockSize: 16}}
- type: inflight-load-producer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: prefix-cache-affinity-filter
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
""", "prefix-cache-affinity-filter")
    a, b = ep(1), ep(2)
    prod = ps.plugins["precise-prefix-cache-producer"]
    prod.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    prod.feed(b.name, [])
    cycle, result = ps.run_cycle(req(body={"prompt": PROMPT}), [a, b], commit=False)
    assert result.targets == [a]  # the affinity filter kept the endpoint holding the prefix
    assert cycle.read(INFLIGHT_LOAD).uncached == {a: 0, b: 4 * BS}  # the precise match, in tokens


def test_hostile_token_ids_match_nothing():
    a = ep(1)
    p = producer({"tokenProcessorConfig": {"blockSize": BS}, "speculativeIndexing": True})
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14])], "m")
    for bad in ([-1] * (2 * BS), [2**40] * (2 * BS)):
        cycle, m = run(p, None, [a], req(body={"prompt": bad}))
        assert (m.matches, m.total_blocks) == ({}, 0)
        p.pre_request(cycle, req(), result(a))  # nothing to speculate, no error


def test_a_block_on_cpu_and_speculative_counts_as_one():
    """The reference's LongestPrefixScorer takes, per block, the highest weight among the
    entries holding it: CPU (0.8) with a speculative entry (no medium: 1.0) counts 1.0."""
    a = ep(1)
    p = producer({"tokenProcessorConfig": {"blockSize": BS}, "speculativeIndexing": True})
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14], medium="CPU")], "m")
    cycle, m = run(p, PROMPT, [a])
    assert m.matches == {a: 3}  # int(4 x 0.8)
    p.pre_request(cycle, req(), result(a))
    m = run(p, PROMPT, [a])[1]
    assert m.matches == {a: 4} and m.by_medium == {a: {"cpu": 4, "speculative": 4}}  # CachedBlocksByTier


def test_pod_cache_size_bounds_the_endpoints_per_block():
    """inMemoryConfig.podCacheSize: each block key keeps its most recently stored entries."""
    a, b, c = ep(1), ep(2), ep(3)
    p = producer({"tokenProcessorConfig": {"blockSize": BS},
                  "indexerConfig": {"kvBlockIndexConfig": {"inMemoryConfig": {"podCacheSize": 2}}}})
    for i, e in enumerate((a, b, c)):
        p.feed(e.name, [stored(PROMPT, [10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4])], "m")
    assert run(p, PROMPT, [a, b, c])[1].matches == {b: 4, c: 4}
    assert p.index.max_holders_per_key == 2 and producer().index.max_holders_per_key == 10  # the reference's default


def with_handle(params: dict, endpoints=(), registry=None):
    """A producer built with a handle listing `endpoints` as the pool and metrics in `registry`."""
    import random

    from prometheus_client import CollectorRegistry

    from epp.assembly import build_plugin
    from epp.framework import PluginHandle
    from epp.framework.metrics import PluginMetrics

    h = PluginHandle(rng=random.Random(1), endpoints=lambda: endpoints,
                     metrics=PluginMetrics(registry if registry is not None else CollectorRegistry()))
    return build_plugin("precise-prefix-cache-producer", None, params, h, "t")


def test_enable_metrics_registers_and_counts_the_index_metrics():
    from prometheus_client import CollectorRegistry

    a = ep(1)
    reg = CollectorRegistry()
    p = with_handle({"tokenProcessorConfig": {"blockSize": BS},
                     "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": True}}}, registry=reg)
    p.feed(a.name, [stored(PROMPT, [11, 12, 13, 14]), BlockRemoved((14, 99), "GPU")], "m")
    run(p, PROMPT, [a])
    run(p, PROMPT[::-1], [a])  # a miss
    for prefix in ("llm_d_epp_kv_cache_index_", "kvcache_index_"):
        got = {n: reg.get_sample_value(f"{prefix}{n}_total") for n in
               ("admissions", "evictions", "lookup_requests", "lookup_hits", "max_pod_hit_count")}
        assert got == {"admissions": 4, "evictions": 2, "lookup_requests": 2, "lookup_hits": 3, "max_pod_hit_count": 3}
        assert reg.get_sample_value(f"{prefix}lookup_latency_seconds_count") == 2
    off = CollectorRegistry()
    run(with_handle({"tokenProcessorConfig": {"blockSize": BS}}, registry=off), PROMPT, [a])
    assert off.get_sample_value("llm_d_epp_kv_cache_index_lookup_requests_total") is None  # off: not registered


async def test_metrics_logging_interval_logs_the_index_metrics(caplog):
    import asyncio

    p = with_handle({"indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": True,
                                                              "metricsLoggingInterval": 20_000_000}}})  # 20 ms
    assert p.params.indexerConfig.kvBlockIndexConfig.logging_interval() == 0.02
    caplog.set_level("INFO", logger="epp.requestcontrol.producers.precise_prefix")
    await p.start_background()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while "kv-block index metrics: admissions=0" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, "no metrics line"
            await asyncio.sleep(0.01)
    finally:
        await p.stop_background()
    quiet = with_handle({"indexerConfig": {"kvBlockIndexConfig": {"metricsLoggingInterval": 20_000_000}}})
    await quiet.start_background()  # without enableMetrics: no task, as the reference
    assert quiet._beat is None  # noqa: SLF001
    await quiet.stop_background()


def test_concurrency_is_accepted_and_says_why_it_has_no_effect(caplog):
    caplog.set_level("INFO", logger="epp.requestcontrol.producers.precise_prefix")
    p = producer({"kvEventsConfig": {"concurrency": 8}})
    assert p.params.kvEventsConfig.concurrency == 8
    assert "kvEventsConfig.concurrency=8 has no effect here" in caplog.text


async def test_pod_label_selector_and_namespace_choose_the_subscribed_endpoints():
    """podDiscoveryConfig.podLabelSelector and podNamespace, when set, filter the endpoints
    subscribed (llm-d-kv-cache's pod reconciler); unset, every endpoint is subscribed."""
    from devstack.launch import free_port
    from epp.framework import Endpoint

    port = free_port()
    e1 = Endpoint("e1", "127.0.0.1", 8001, labels={"app": "vllm"}, namespace="ns1")
    e2 = Endpoint("e2", "127.0.0.1", 8002, labels={"app": "other"}, namespace="ns1")
    e3 = Endpoint("e3", "127.0.0.1", 8003, labels={"app": "vllm"}, namespace="ns2")
    p = producer({"kvEventsConfig": {"podDiscoveryConfig": {"podLabelSelector": "app in (vllm)",
                                                            "podNamespace": "ns1", "socketPort": port}}})
    try:
        for e in (e1, e2, e3):
            p.extract_endpoint("upsert", e)
        assert set(p.intake.streams) == {"e1"}
        e1.labels = {"app": "other"}  # relabelled out of the selector
        p.extract_endpoint("upsert", e1)
        assert set(p.intake.streams) == set()
    finally:
        await p.stop_background()
    everyone = producer({"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": port}}})
    try:
        for e in (e1, e2, e3):
            everyone.extract_endpoint("upsert", e)
        assert set(everyone.intake.streams) == {"e1", "e2", "e3"}
    finally:
        await everyone.stop_background()
    assert "podLabelSelector" in plugin_set_error(
        "plugins:\n- type: precise-prefix-cache-producer\n  parameters: {kvEventsConfig: {podDiscoveryConfig: "
        "{podLabelSelector: 'a in (b'}}}\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n"
        "  plugins:\n  - pluginRef: max-score-picker\n")


async def test_global_socket_counts_events_from_before_the_first_request():
    """kvEventsConfig.zmqEndpoint without endpoint-notification-source: a topic's pod is
    looked up among the pool's endpoints (PluginHandle.endpoints), so the events a server
    publishes before any request reaches the picker are indexed, not dropped."""
    import asyncio

    import msgpack
    import zmq
    import zmq.asyncio

    from devstack.launch import free_port
    from epp.framework import Endpoint

    a, b = Endpoint("a", "127.0.0.1", 8001), Endpoint("b", "127.0.0.1", 8002)
    port = free_port()
    p = with_handle({"tokenProcessorConfig": {"blockSize": BS}, "kvEventsConfig": {
        "zmqEndpoint": f"tcp://127.0.0.1:{port}"}}, endpoints=(a, b))
    await p.start_background()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{port}")
    try:
        event = ["BlockStored", [11, 12, 13, 14], None, PROMPT, BS, None, "GPU", None]
        deadline = asyncio.get_running_loop().time() + 10
        seq = 0
        while p.index.blocks_of("b") == 0:  # resent until the connection is up (ZMQ's slow joiner)
            assert asyncio.get_running_loop().time() < deadline, "events never arrived"
            await pub.send_multipart([b"kv@127.0.0.1:8002@m", seq.to_bytes(8, "big"),
                                      msgpack.packb([0.0, [event], 0])])
            seq += 1
            await asyncio.sleep(0.02)
        assert run(p, PROMPT, [a, b])[1].matches == {b: 4} and p.is_precise("b")
        assert p.intake.global_stream.unrouted == 0
    finally:
        pub.close()
        ctx.term()
        await p.stop_background()


async def test_queue_depth_is_the_messages_waiting_on_every_stream():
    """llm_d_epp_kv_cache_events_pool_queue_depth: the reference's gauge of messages queued
    for the event workers; here the messages each endpoint's stream holds unapplied."""
    from prometheus_client import CollectorRegistry

    from devstack.launch import free_port
    from epp.framework import Endpoint

    reg = CollectorRegistry()
    p = with_handle({"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": free_port()}}}, registry=reg)
    try:
        for i in (1, 2):
            p.extract_endpoint("upsert", Endpoint(f"e{i}", "127.0.0.1", 8000 + i))
        assert reg.get_sample_value("llm_d_epp_kv_cache_events_pool_queue_depth") == 0
        p.intake.streams["e1"].queued, p.intake.streams["e2"].queued = 3, 2
        assert reg.get_sample_value("llm_d_epp_kv_cache_events_pool_queue_depth") == 5
    finally:
        await p.stop_background()


async def test_global_socket_and_per_endpoint_subscriptions_run_together():
    """zmqEndpoint plus discoverPods (its default) with endpoints from endpoint-notification-
    source: as the reference (producer.go New starts the global "local-subscriber" whatever
    discoverPods says; extractor.go Extract adds per-pod subscribers beside it), both run.
    A server publishing into the global socket is precise whether its own subscription came
    before its events (a) or after (b, whose blocks it does not clear); its delete ends both."""
    import asyncio

    import msgpack
    import zmq
    import zmq.asyncio

    from devstack.launch import free_port
    from epp.framework import Endpoint

    a, b = Endpoint("a", "127.0.0.1", 8001), Endpoint("b", "127.0.0.1", 8002)
    port = free_port()
    p = with_handle({"tokenProcessorConfig": {"blockSize": BS}, "kvEventsConfig": {
        "zmqEndpoint": f"tcp://127.0.0.1:{port}", "podDiscoveryConfig": {"socketPort": free_port()}}}, endpoints=(a, b))
    await p.start_background()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{port}")
    event = msgpack.packb([0.0, [["BlockStored", [11, 12, 13, 14], None, PROMPT, BS, None, "GPU", None]], 0])
    seq = iter(range(10_000))
    try:
        p.extract_endpoint("upsert", a)  # subscribed before its first event
        for e in (a, b):
            deadline = asyncio.get_running_loop().time() + 10
            while p.index.blocks_of(e.name) == 0:  # resent until the connection is up
                assert asyncio.get_running_loop().time() < deadline, "events never arrived"
                await pub.send_multipart([f"kv@{e.hostport}@m".encode(), next(seq).to_bytes(8, "big"), event])
                await asyncio.sleep(0.02)
        p.extract_endpoint("upsert", b)  # subscribed after its events
        assert set(p.intake.subscribed) == set(p.intake.routed) == {"a", "b"}
        assert run(p, PROMPT, [a, b])[1].matches == {a: 4, b: 4} and p.is_precise("a") and p.is_precise("b")
        p.extract_endpoint("delete", b)
        assert "b" not in p.intake.streams and p.index.blocks_of("b") == 0 and p.stream_status("b")[0] == "unsubscribed"
    finally:
        pub.close()
        ctx.term()
        await p.stop_background()
