"""approx-prefix-cache-producer's parameters and defaults as today's reference
(llm-d-router pkg/epp/framework/plugins/requestcontrol/dataproducer/approximateprefix/plugin.go,
types.go: maxPrefixTokensToMatch 131072 wins over the deprecated maxPrefixBlocksToMatch 2048,
the 64-token block-size floor, the deprecated blockSize mapped onto blockSizeTokens), the
v1.5-form prefix-cache-scorer config keeping GIE v1.5.0's semantics (approximateprefix/types.go
at v1.5.0: 256 blocks, 16-token blocks, no floor), and prefix-cache-scorer's match-length term
(scheduling/scorer/prefix/plugin.go)."""


import pytest

from epp.assembly import build_plugin
from epp.config import ConfigError, load_config
from epp.framework import (
    CycleState,
    InferenceRequest,
    PluginHandle,
    ProfileRunResult,
    SchedulingResult,
)
from epp.framework.datakeys import PREFIX_MATCH_INFO, PrefixCacheMatchInfo
from epp.requestcontrol.producers.prefix import UNLIMITED_BLOCKS, resolve_max_blocks
from tests.helpers import ep, plugin


def req(prompt, model="m"):
    return InferenceRequest("r", model, model, "completions", prompt, {})


def producer(params=None):
    return plugin("approx-prefix-cache-producer", params, where="t", seed=1)


def info(p, prompt, endpoints):
    cycle = CycleState()
    p.prepare_request_data(cycle, req(prompt), endpoints)
    return cycle.read(PREFIX_MATCH_INFO.of(p.name))


def test_block_size_floor_applies_to_configured_and_engine_reported_sizes():
    e16, e128, bare = ep(1, block_size=16), ep(2, block_size=128), ep(3)
    p = producer()
    assert p._block_size_tokens([bare]) == 64  # default blockSizeTokens 16 -> 64
    assert p._block_size_tokens([e16]) == 64  # engine-reported 16 -> 64
    assert p._block_size_tokens([e128]) == 128  # autoTune: the engine's size when >= 64
    assert producer({"autoTune": False, "blockSizeTokens": 32})._block_size_tokens([e128]) == 64
    assert producer({"autoTune": False, "blockSizeTokens": 256})._block_size_tokens([e128]) == 256
    m = info(p, "a" * 64 * 4 * 3, [bare])  # 3 blocks of 64 tokens x 4 bytes
    assert (m.block_size_tokens, m.total_blocks) == (64, 3)


def test_max_prefix_tokens_wins_and_both_zero_match_the_whole_prompt():
    p = producer().params
    assert resolve_max_blocks(p, 64) == 131072 // 64 == 2048
    assert resolve_max_blocks(p, 128) == 1024  # the token cap is independent of the block size
    q = producer({"maxPrefixTokensToMatch": 40960, "maxPrefixBlocksToMatch": 10}).params
    assert resolve_max_blocks(q, 64) == 640  # tokens win over blocks
    assert resolve_max_blocks(producer({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 10}).params, 64) == 10
    assert resolve_max_blocks(producer({"maxPrefixTokensToMatch": 0}).params, 64) == 2048  # deprecated default
    both_zero = producer({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 0})
    assert resolve_max_blocks(both_zero.params, 64) == UNLIMITED_BLOCKS
    long_prompt = "z" * 64 * 4 * 3000
    assert info(both_zero, long_prompt, [ep(1)]).total_blocks == 3000
    assert info(producer({"maxPrefixTokensToMatch": 64 * 100}), long_prompt, [ep(1)]).total_blocks == 100
    assert info(producer(), long_prompt, [ep(1)]).total_blocks == 2048


def test_deprecated_block_size_maps_onto_block_size_tokens_left_at_its_default():
    assert producer({"blockSize": 128}).params.blockSizeTokens == 128
    assert producer({"blockSize": 128, "blockSizeTokens": 256}).params.blockSizeTokens == 256
    assert producer({"blockSize": 128}).params.blockSize is None
    with pytest.raises(ValueError, match="maxPrefixTokensToMatch: must be >= 0"):
        producer({"maxPrefixTokensToMatch": -1})


def test_lru_capacity_zero_means_the_default():
    assert producer({"lruCapacityPerServer": 0, "autoTune": False})._capacity(ep(1)) == 31250
    assert producer({"lruCapacityPerServer": 7, "autoTune": False})._capacity(ep(1, num_gpu_blocks=99)) == 7
    assert producer({"lruCapacityPerServer": 7})._capacity(ep(1, num_gpu_blocks=99)) == 99


def test_v15_semantics_keep_small_blocks_and_256_blocks():
    p = producer({"legacyV15": True})
    assert p._block_size_tokens([ep(1)]) == 16 and p._block_size_tokens([ep(2, block_size=8)]) == 8
    assert resolve_max_blocks(p.params, 16) == 256
    assert info(p, "y" * 16 * 4 * 1000, [ep(1)]).total_blocks == 256
    chars = producer({"legacyV15": True, "blockSize": 32, "autoTune": False})  # v1.x: blockSize in characters
    assert info(chars, "y" * 32 * 5, [ep(1)]).total_blocks == 5


def test_v15_scorer_form_gets_a_v15_producer_and_the_bare_scorer_todays():
    v15 = load_config("plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: 16, "
                      "maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}}]")
    spec = v15.plugin("approx-prefix-cache-producer")
    assert spec.implicit and spec.parameters["legacyV15"] is True
    bare = load_config("plugins: [{type: prefix-cache-scorer}]")
    assert bare.plugin("approx-prefix-cache-producer").parameters == {}  # the reference's default producer
    fixture = load_config("""
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 40960}
- type: prefix-cache-scorer
""")
    assert [p.type for p in fixture.plugins if p.type.startswith("approx")] == ["approx-prefix-cache-producer"]
    with pytest.raises(ConfigError, match="plugins.0..parameters.legacyV15: expected a boolean"):
        load_config("plugins: [{type: approx-prefix-cache-producer, parameters: {legacyV15: 1}}]")


def test_match_length_term_of_the_scorer():
    a, b, c = ep(1), ep(2), ep(3)
    m = PrefixCacheMatchInfo({a: 64, b: 128}, total_blocks=256, block_size_tokens=64, longest=128)
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_INFO, m)

    def scorer(params=None):
        return build_plugin("prefix-cache-scorer", None, params, PluginHandle(), "t")

    assert scorer().score(cycle, req("x"), [a, b, c]) == [0.25, 0.5, 0.0]  # weight 0: the ratio
    s = scorer({"matchLengthWeight": 0.5})  # scale 8192 tokens
    # a: 64 x 64 = 4096 tokens -> (0.5)^2; b: 8192 -> 1.0
    assert s.score(cycle, req("x"), [a, b, c]) == [pytest.approx(0.5 * 0.25 + 0.5 * 0.25),
                                                   pytest.approx(0.5 * 1.0 + 0.5 * 0.5), 0.0]
    s2 = scorer({"matchLengthWeight": 1.0, "matchLengthScaleTokens": 2048})
    assert s2.score(cycle, req("x"), [a, b, c]) == [1.0, 1.0, 0.0]  # capped at 1
    with pytest.raises(ValueError, match=r"matchLengthWeight: must be in \[0, 1\]"):
        scorer({"matchLengthWeight": 1.5})
    with pytest.raises(ValueError, match="matchLengthScaleTokens: must be > 0 when matchLengthWeight"):
        scorer({"matchLengthWeight": 0.1, "matchLengthScaleTokens": 0})
    assert scorer({"matchLengthScaleTokens": 0}).score(cycle, req("x"), [a]) == [0.25]  # unused at weight 0


def test_the_last_shorter_block_counts_as_in_the_reference():
    """prefixhash/hashing.go getKVCacheBlocksFromTokens: token blocks, the last one shorter;
    estimate.go packBytes: 4 bytes per token, the last zero-padded. v1.5 hashed whole blocks only."""
    p = producer()
    a, b = ep(1), ep(2)
    base = "s" * 64 * 4 * 2
    assert info(p, base + "tail!", [a]).total_blocks == 3
    assert info(p, "short", [a]).total_blocks == 1
    assert info(producer({"legacyV15": True}), "short", [a]).total_blocks == 0
    cycle = CycleState()
    p.prepare_request_data(cycle, req(base + "tail!"), [a, b])
    p.pre_request(cycle, req(base + "tail!"), SchedulingResult({"d": ProfileRunResult([a])}, "d"))
    assert info(p, base + "tail!", [a, b]).matches == {a: 3}  # the same prompt: every block, the tail too
    assert info(p, base + "other", [a, b]).matches == {a: 2}  # another tail: the whole blocks only
    assert info(p, base + "tail!\0", [a, b]).matches == {a: 3}  # zero padding, as the reference packs bytes
