"""Approximate prefix-cache matching: hashing, index LRU/purge, autoTune, scoring."""

import random

import pytest
import xxhash

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    Metrics,
    PluginHandle,
    ProfileRunResult,
    SchedulingResult,
)
from epp.registry import build_plugin
from scorers.prefix import PrefixIndex, block_hashes


def ep(i, **metrics):
    return Endpoint(f"e{i}", f"10.0.0.{i}", 8000, metrics=Metrics(**metrics))


def req(prompt, model="m", salt=""):
    return InferenceRequest("r", model, model, "completions", prompt, {}, cache_salt=salt)


def scorer(params=None):
    return build_plugin("prefix-cache-scorer", None, params, PluginHandle(rng=random.Random(1)), "t")


def commit(p, request, *targets, decode=None):
    cycle = CycleState()
    p.prepare_request_data(cycle, request, list(targets) + ([decode] if decode else []))
    results = {"default": ProfileRunResult(list(targets))}
    if decode is not None:
        results["prefill"] = ProfileRunResult([decode])
    p.pre_request(cycle, request, SchedulingResult(results, "default"))


def scores(p, request, endpoints):
    cycle = CycleState()
    p.prepare_request_data(cycle, request, endpoints)
    return p.score(cycle, request, endpoints)


def test_block_hashes_chain_formula():
    text = "a" * 64 + "b" * 64 + "c" * 10  # trailing partial block dropped
    hs = block_hashes(text, "model", "salt", 64, 256)
    h0 = xxhash.xxh64_intdigest(b"modelsalt")
    h1 = xxhash.xxh64_intdigest(b"a" * 64 + h0.to_bytes(8, "little"))
    h2 = xxhash.xxh64_intdigest(b"b" * 64 + h1.to_bytes(8, "little"))
    assert hs == [h1, h2]
    assert block_hashes("a" * 63, "model", "", 64, 256) == []  # shorter than one block
    assert len(block_hashes("x" * 100_000, "m", "", 64, 256)) == 256  # truncated to maxPrefixBlocksToMatch
    assert block_hashes(text, "other", "salt", 64, 256)[0] != h1  # model name seeds the chain
    assert len(block_hashes("é" * 64, "m", "", 64, 256)) == 2  # UTF-8 bytes, not characters


def _reference_hashes(text, model, block, limit):
    data = text.encode()
    h = xxhash.xxh64_intdigest(model.encode())
    out = []
    for i in range(min(len(data) // block, limit)):
        h = xxhash.xxh64_intdigest(data[i * block:(i + 1) * block] + h.to_bytes(8, "little"))
        out.append(h)
    return out


def test_memoised_hashing_matches_the_formula_on_shared_prefixes():
    rng = random.Random(4)
    shared = "".join(rng.choice("abcdefgh ") for _ in range(64 * 40))
    texts = [shared + "".join(rng.choice("xyz ") for _ in range(n)) for n in (0, 5, 3000, 20000)]
    for _ in range(2):  # second round answers from the memo
        for t in texts:
            for block in (64, 128, 7):
                assert block_hashes(t, "m", "", block, 256) == _reference_hashes(t, "m", block, 256)


def test_index_match_leading_blocks():
    idx = PrefixIndex()
    a, b, c = ep(1), ep(2), ep(3)
    idx.record(a, [1, 2, 3, 4], 100)
    idx.record(b, [1, 2], 100)
    idx.record(c, [9], 100)
    counts, depth = idx.match([1, 2, 3, 4, 5])
    assert counts == {a: 4, b: 2} and depth == 4
    assert idx.match([7, 1, 2]) == ({}, 0)  # the walk stops at the first hash nobody holds
    assert idx.match([]) == ({}, 0)


def test_index_lru_evicts_trailing_blocks_first_and_purges():
    idx = PrefixIndex()
    a, b = ep(1), ep(2)
    idx.record(a, [1, 2, 3], 4)
    idx.record(a, [10, 11], 4)  # capacity 4: the oldest trailing block (3) goes
    assert idx.holders(3) == frozenset()
    assert idx.match([1, 2, 3])[0] == {a: 2}
    assert idx.endpoint_size(a) == 4
    idx.record(b, [1, 2], 10)
    idx.purge(a)
    assert idx.holders(1) == {b} and idx.holders(10) == frozenset()
    assert idx.endpoint_size(a) == 0
    idx.purge(b)
    assert len(idx) == 0


def test_scorer_scores_fraction_and_records_on_targets():
    p = scorer()
    e1, e2, e3 = ep(1), ep(2), ep(3)
    base = "s" * 64 * 4  # 4 blocks of 16 tokens x 4 chars
    commit(p, req(base + "t" * 64 * 4), e1)
    commit(p, req(base), e2)
    s = scores(p, req(base + "t" * 64 * 4), [e1, e2, e3])
    assert s == [1.0, 0.5, 0.0]
    assert scores(p, req("short"), [e1, e2]) == [0.0, 0.0]  # no whole block: no hashes
    assert scores(p, req(base, model="other"), [e1, e2]) == [0.0, 0.0]
    assert scores(p, req(base, salt="tenant-b"), [e1, e2]) == [0.0, 0.0]


def test_scorer_records_on_prefill_endpoint_too_and_purges():
    p = scorer()
    d, pf = ep(1), ep(2)
    prompt = "q" * 64 * 3
    commit(p, req(prompt), d, decode=pf)
    assert scores(p, req(prompt), [d, pf]) == [1.0, 1.0]
    p.endpoints_removed([d])
    assert scores(p, req(prompt), [d, pf]) == [0.0, 1.0]


def test_fallback_targets_are_not_recorded():
    p = scorer()
    a, b = ep(1), ep(2)
    commit(p, req("z" * 128), a, b)
    assert scores(p, req("z" * 128), [a, b]) == [1.0, 0.0]


def test_autotune_uses_endpoint_block_size_and_capacity():
    p = scorer()
    e = ep(1, block_size=32, num_gpu_blocks=3)
    cycle = CycleState()
    p.prepare_request_data(cycle, req("k" * 128 * 5), [e])
    m = cycle["prefix-cache"]
    assert m.block_size_tokens == 32 and m.total == 5  # 32 tokens x 4 chars = 128 per block
    p.pre_request(cycle, req("k" * 128 * 5), SchedulingResult({"d": ProfileRunResult([e])}, "d"))
    assert p.index.endpoint_size(e) == 3  # LRU capacity = num_gpu_blocks
    assert scores(p, req("k" * 128 * 5), [e]) == [pytest.approx(3 / 5)]  # leading 3 blocks kept

    fixed = scorer({"autoTune": False, "blockSizeTokens": 8, "lruCapacityPerServer": 2})
    c2 = CycleState()
    fixed.prepare_request_data(c2, req("k" * 32 * 5), [e])
    assert c2["prefix-cache"].total == 5 and c2["prefix-cache"].block_size_tokens == 8
    fixed.pre_request(c2, req("k"), SchedulingResult({"d": ProfileRunResult([e])}, "d"))
    assert fixed.index.endpoint_size(e) == 2


def test_cached_tokens_for_pd_decider():
    p = scorer({"autoTune": False})
    e = ep(1)
    commit(p, req("w" * 64 * 3), e)
    cycle = CycleState()
    p.prepare_request_data(cycle, req("w" * 64 * 5), [e])
    assert cycle["prefix-cache"].cached_tokens(e) == 3 * 16
