"""Approximate prefix-cache matching: hashing, index LRU/purge, autoTune (the producer), and
scoring from the published match (prefix-cache-scorer)."""

import random
from collections import OrderedDict

import pytest
import xxhash

from epp.assembly import build_plugin
from epp.framework import (
    CycleState,
    InferenceRequest,
    PluginHandle,
    ProfileRunResult,
    SchedulingResult,
)
from epp.framework.datakeys import PREFIX_MATCH_INFO
from epp.requestcontrol.producers.prefix_blocks import block_hashes
from epp.requestcontrol.producers.prefix_index import PrefixIndex
from tests.helpers import ep, plugin


def req(prompt, model="m", salt=""):
    return InferenceRequest("r", model, model, "completions", prompt, {}, cache_salt=salt)


# These tests pin the matching formulas on small blocks: GIE v1.5.0's semantics (no 64-token
# floor), which a v1.5-form prefix-cache-scorer config keeps (legacyV15, set by the config
# loader). Today's defaults and the floor: tests/test_producers_prefix.py.
V15 = {"legacyV15": True}


def producer(params=None):
    return plugin("approx-prefix-cache-producer", {**V15, **(params or {})}, where="t", seed=1)


SCORER = build_plugin("prefix-cache-scorer", None, None, PluginHandle(), "t")


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
    return SCORER.score(cycle, request, endpoints)


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


def test_hash_memo_stays_bounded_and_exact_when_it_overflows(monkeypatch):
    import epp.requestcontrol.producers.prefix_blocks as prefix

    monkeypatch.setattr(prefix, "_MEMO_CAPACITY", 8)
    monkeypatch.setattr(prefix, "_memo", {})
    rng = random.Random(9)
    texts = ["".join(rng.choice("abcd ") for _ in range(64 * 16 * 3 + 50)) for _ in range(6)]
    for _ in range(3):  # 6 texts x 3 groups overflow 8 entries: evictions between rounds
        for t in texts:
            assert block_hashes(t, "m", "", 64, 256) == _reference_hashes(t, "m", 64, 256)
            assert len(prefix._memo) <= 8
    # a memoised prefix followed by new text: part from the memo, the rest chained
    t = texts[-1][:64 * 16] + "zz" * 64 * 8
    assert block_hashes(t, "m", "", 64, 256) == _reference_hashes(t, "m", 64, 256)


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
    p = producer()
    e1, e2, e3 = ep(1), ep(2), ep(3)
    base = "s" * 64 * 4  # 4 blocks of 16 tokens x 4 chars
    commit(p, req(base + "t" * 64 * 4), e1)
    commit(p, req(base), e2)
    s = scores(p, req(base + "t" * 64 * 4), [e1, e2, e3])
    assert s == [1.0, 0.5, 0.0]
    for prompt in (base + "t" * 64 * 4, base, base + "u" * 64, "v" * 64):
        _, info = p.match(req(prompt), [e1, e2, e3])
        assert info.longest == max(info.matches.values(), default=0)  # what the hit metrics report
    assert scores(p, req("short"), [e1, e2]) == [0.0, 0.0]  # no whole block: no hashes
    assert scores(p, req(base, model="other"), [e1, e2]) == [0.0, 0.0]
    assert scores(p, req(base, salt="tenant-b"), [e1, e2]) == [0.0, 0.0]


def test_scorer_records_on_prefill_endpoint_too_and_purges():
    p = producer()
    d, pf = ep(1), ep(2)
    prompt = "q" * 64 * 3
    commit(p, req(prompt), d, decode=pf)
    assert scores(p, req(prompt), [d, pf]) == [1.0, 1.0]
    p.endpoints_removed([d])
    assert scores(p, req(prompt), [d, pf]) == [0.0, 1.0]


def test_fallback_targets_are_not_recorded():
    p = producer()
    a, b = ep(1), ep(2)
    commit(p, req("z" * 128), a, b)
    assert scores(p, req("z" * 128), [a, b]) == [1.0, 0.0]


def test_autotune_uses_endpoint_block_size_and_capacity():
    p = producer()
    e = ep(1, block_size=32, num_gpu_blocks=3)
    cycle = CycleState()
    p.prepare_request_data(cycle, req("k" * 128 * 5), [e])
    m = cycle.read(PREFIX_MATCH_INFO)
    assert m.block_size_tokens == 32 and m.total == 5  # 32 tokens x 4 chars = 128 per block
    p.pre_request(cycle, req("k" * 128 * 5), SchedulingResult({"d": ProfileRunResult([e])}, "d"))
    assert p.index.endpoint_size(e) == 3  # LRU capacity = num_gpu_blocks
    assert scores(p, req("k" * 128 * 5), [e]) == [pytest.approx(3 / 5)]  # leading 3 blocks kept

    fixed = producer({"autoTune": False, "blockSizeTokens": 8, "lruCapacityPerServer": 2})
    c2 = CycleState()
    fixed.prepare_request_data(c2, req("k" * 32 * 5), [e])
    assert c2.read(PREFIX_MATCH_INFO).total == 5 and c2.read(PREFIX_MATCH_INFO).block_size_tokens == 8
    fixed.pre_request(c2, req("k"), SchedulingResult({"d": ProfileRunResult([e])}, "d"))
    assert fixed.index.endpoint_size(e) == 2


def test_cached_tokens_for_pd_decider():
    p = producer({"autoTune": False})
    e = ep(1)
    commit(p, req("w" * 64 * 3), e)
    cycle = CycleState()
    p.prepare_request_data(cycle, req("w" * 64 * 5), [e])
    assert cycle.read(PREFIX_MATCH_INFO).cached_tokens(e) == 3 * 16


# --------------------------------------------------------------------------- the index's LRU structure
class _ReferenceIndex:
    """The specification: one OrderedDict LRU per endpoint, touched walking the hashes from
    last to first, oldest popped over capacity; holders and matches derived by brute force."""

    def __init__(self):
        self.lrus = {}

    def record(self, endpoint, hashes, capacity):
        lru = self.lrus.setdefault(endpoint, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity:
            lru.popitem(last=False)

    def purge(self, endpoint):
        self.lrus.pop(endpoint, None)

    def holders(self, h):
        return frozenset(e for e, lru in self.lrus.items() if h in lru)

    def match(self, hashes):
        counts, depth = {}, 0
        for h in hashes:
            held = self.holders(h)
            if not held:
                break
            depth += 1
            for e in held:
                if counts.get(e, 0) == depth - 1:
                    counts[e] = depth
        return counts, depth


def _assert_same(idx, ref, endpoints, universe):
    for e in endpoints:
        lru = ref.lrus.get(e, {})
        assert idx.blocks(e) == list(lru), e  # same blocks in the same LRU order
        assert idx.endpoint_size(e) == len(lru)
    assert len(idx) == len(set().union(*ref.lrus.values()))
    for h in universe:
        assert idx.holders(h) == ref.holders(h), h


def test_index_lru_order_after_retouching_a_block():
    idx, ref = PrefixIndex(), _ReferenceIndex()
    a = ep(1)
    for hs in ([1, 2, 3], [4, 5], [1, 2], [4]):  # [1, 2] and then [4] move back to the end
        idx.record(a, hs, 10)
        ref.record(a, hs, 10)
    assert idx.blocks(a) == list(ref.lrus[a]) == [3, 5, 2, 1, 4]
    idx.record(a, [6, 7], 5)  # two over capacity: the oldest (3, 5) go, not the re-touched 1, 2
    ref.record(a, [6, 7], 5)
    assert idx.blocks(a) == list(ref.lrus[a]) == [2, 1, 4, 7, 6]
    assert idx.holders(3) == idx.holders(5) == frozenset() and len(idx) == 5


def test_index_eviction_of_blocks_shared_by_two_endpoints():
    idx = PrefixIndex()
    a, b = ep(1), ep(2)
    idx.record(a, [1, 2, 3], 3)
    idx.record(b, [1, 2, 9], 3)
    assert idx.holders(1) == idx.holders(2) == {a, b}
    idx.record(a, [20, 21], 3)  # a evicts 3 and 2: b keeps holding 2
    assert idx.blocks(a) == [1, 21, 20]
    assert idx.holders(2) == {b} and idx.holders(1) == {a, b} and idx.holders(3) == frozenset()
    assert idx.match([1, 2, 9]) == ({a: 1, b: 3}, 3)
    idx.record(b, [30, 31, 32], 3)  # b evicts everything it had
    assert idx.holders(1) == {a} and idx.holders(2) == idx.holders(9) == frozenset()
    assert idx.match([1, 2]) == ({a: 1}, 1)
    assert len(idx) == 6  # 1, 20, 21 on a; 30, 31, 32 on b


def test_index_purge_keeps_other_endpoints_and_forgets_the_endpoint():
    idx = PrefixIndex()
    a, b = ep(1), ep(2)
    idx.record(a, [1, 2, 3], 100)
    idx.record(b, [1, 2], 100)
    idx.record(a, [1, 5], 100)  # re-touch 1 on a: a hole in a's first run
    idx.purge(a)
    assert idx.blocks(a) == [] and idx.endpoint_size(a) == 0
    assert idx.holders(1) == idx.holders(2) == {b} and idx.holders(3) == idx.holders(5) == frozenset()
    assert idx.match([1, 2, 3]) == ({b: 2}, 2)
    idx.purge(a)  # unknown endpoint: nothing to do
    idx.record(a, [1], 100)  # a returns with an empty LRU
    assert idx.blocks(a) == [1] and idx.holders(1) == {a, b}


def test_index_repeated_prompt_keeps_one_run_and_repeated_hash_keeps_first_position():
    idx, ref = PrefixIndex(), _ReferenceIndex()
    a = ep(1)
    for _ in range(100):
        idx.record(a, [1, 2, 3], 10)
        ref.record(a, [1, 2, 3], 10)
    assert idx.blocks(a) == [3, 2, 1] and len(list(idx._lrus[a])) == 1  # no pile-up of emptied runs
    for hs in ([7, 8, 7, 9], [9, 1, 9]):  # only a 64-bit collision repeats a chain hash
        idx.record(a, hs, 10)
        ref.record(a, hs, 10)
    assert idx.blocks(a) == list(ref.lrus[a]) == [3, 2, 8, 7, 1, 9]
    assert idx.endpoint_size(a) == 6


def _chain_requests(rng, count):
    """Chains with shared prefixes (ints stand in for chained hashes: a hash fixes its prefix)."""
    bases = [[rng.getrandbits(64) for _ in range(12)] for _ in range(5)]
    out = []
    for _ in range(count):
        base = rng.choice(bases)
        keep = rng.randint(0, len(base))
        tail = [rng.getrandbits(64) for _ in range(rng.randint(0, 4))] if keep < len(base) or rng.random() < 0.3 else []
        out.append(base[:keep] + tail)
        if rng.random() < 0.2:  # a longer chain that later requests can share
            bases.append(base[:keep] + [rng.getrandbits(64) for _ in range(8)])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_index_matches_the_ordereddict_specification(seed):
    rng = random.Random(seed)
    endpoints = [ep(i) for i in range(4)]
    idx, ref = PrefixIndex(), _ReferenceIndex()
    reqs = _chain_requests(rng, 300)
    universe = {h for r in reqs for h in r}
    for i, hs in enumerate(reqs):
        e = rng.choice(endpoints)
        cap = rng.choice((5, 12, 30))
        if rng.random() < 0.05:
            idx.purge(e)
            ref.purge(e)
        else:
            idx.record(e, hs, cap)
            ref.record(e, hs, cap)
        probe = rng.choice(reqs)
        assert idx.match(probe) == ref.match(probe)
        if i % 10 == 0:
            _assert_same(idx, ref, endpoints, universe)
    _assert_same(idx, ref, endpoints, universe)
    for e in endpoints:
        idx.purge(e)
    assert len(idx) == 0


def test_index_lru_contents_match_the_specification_for_arbitrary_hashes():
    rng = random.Random(11)
    endpoints = [ep(i) for i in range(3)]
    idx, ref = PrefixIndex(), _ReferenceIndex()
    for _ in range(400):  # small alphabet: overlaps, re-touches, repeats within a request
        e = rng.choice(endpoints)
        hs = [rng.randrange(40) for _ in range(rng.randint(0, 10))]
        cap = rng.choice((3, 8, 20))
        idx.record(e, hs, cap)
        ref.record(e, hs, cap)
        _assert_same(idx, ref, endpoints, range(40))


@pytest.mark.parametrize("seed", range(4))
def test_index_moving_whole_runs_matches_the_specification(seed):
    """Requests spliced from earlier ones (repeats, shared heads, several earlier runs in a
    row, repeated hashes): the paths that move and split runs instead of touching blocks."""
    rng = random.Random(100 + seed)
    endpoints = [ep(i) for i in range(2)]
    idx, ref = PrefixIndex(), _ReferenceIndex()
    past = [[rng.getrandbits(64) for _ in range(6)]]
    universe = set(past[0])
    for _ in range(500):
        hs = []
        for _ in range(rng.randint(1, 3)):
            src = rng.choice(past)
            a = rng.choice((0, 0, rng.randrange(len(src) + 1)))
            hs += src[a:rng.randint(a, len(src))]
        hs += [rng.getrandbits(64) for _ in range(rng.choice((0, 0, 1, 3)))]
        past.append(hs)
        universe.update(hs)
        e = rng.choice(endpoints)
        cap = rng.choice((6, 15, 40, 40))
        idx.record(e, hs, cap)
        ref.record(e, hs, cap)
        _assert_same(idx, ref, endpoints, universe)


def test_producer_registers_the_prefix_metrics_through_the_handle():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from epp.framework.metrics import PluginMetrics

    reg = CollectorRegistry()
    handle = PluginHandle(metrics=PluginMetrics(reg))
    p = build_plugin("approx-prefix-cache-producer", None, V15, handle, "t")
    p2 = build_plugin("approx-prefix-cache-producer", "second", {**V15, "autoTune": False}, handle, "t")
    e1, e2 = ep(1), ep(2)
    commit(p, req("a" * 64 * 4), e1)  # nothing held yet: ratio 0, 0 bytes
    commit(p, req("a" * 64 * 2 + "b" * 64 * 2), e2)  # e1 holds 2 of 4 blocks: ratio 0.5, 2 x 16 x 4 bytes
    commit(p2, req("c" * 64), e1)  # the second producer adds to the same families
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert samples[("inference_extension_prefix_indexer_size", None)] == len(p.index) + len(p2.index) == 7
    ratio = "inference_extension_prefix_indexer_hit_ratio"
    assert (samples[(f"{ratio}_bucket", "0.0")], samples[(f"{ratio}_bucket", "0.4")],
            samples[(f"{ratio}_bucket", "0.5")], samples[(f"{ratio}_bucket", "+Inf")]) == (2, 2, 3, 3)
    assert samples[(f"{ratio}_count", None)] == 3 and samples[(f"{ratio}_sum", None)] == 0.5
    hit_bytes = "inference_extension_prefix_indexer_hit_bytes"
    assert (samples[(f"{hit_bytes}_bucket", "64.0")], samples[(f"{hit_bytes}_bucket", "128.0")]) == (2, 3)
    assert samples[(f"{hit_bytes}_sum", None)] == 128


def test_scorer_reads_only_the_producer_it_names():
    a, b = producer(), build_plugin("approx-prefix-cache-producer", "b", V15, PluginHandle(), "t")
    e = ep(1)
    commit(a, req("x" * 64 * 2), e)
    named_b = build_plugin("prefix-cache-scorer", None, {"prefixMatchInfoProducerName": "b"}, PluginHandle(), "t")
    cycle = CycleState()
    a.prepare_request_data(cycle, req("x" * 64 * 2), [e])
    assert SCORER.score(cycle, req("x"), [e]) == [1.0]
    assert named_b.score(cycle, req("x"), [e]) == [0.0]  # b published nothing: no match, score 0
    b.prepare_request_data(cycle, req("x" * 64 * 2), [e])
    assert named_b.score(cycle, req("x"), [e]) == [0.0] and cycle.read(PREFIX_MATCH_INFO.of("b")).total == 2
