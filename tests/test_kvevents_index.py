"""The block index built from KV events: stored/removed/cleared, media, LoRA roots, bounds,
speculation, and longest-prefix lookup against a brute-force model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datalayer.kvevents import (
    AllBlocksCleared,
    BlockIndex,
    BlockKeyer,
    BlockRemoved,
    BlockStored,
    PrefixMatch,
)

BS = 4  # small blocks keep the tests readable


class FakeServer:
    """Emits BlockStored/BlockRemoved the way vLLM does, with its own (seeded) block hashes."""

    def __init__(self, seed: int, block_size: int = BS, lora: str | None = None) -> None:
        self.seed, self.bs, self.lora = seed, block_size, lora

    def hashes(self, tokens: list[int]) -> list[int]:
        out, parent = [], self.seed
        for i in range(len(tokens) // self.bs):
            parent = hash((parent, tuple(tokens[i * self.bs:(i + 1) * self.bs]), self.lora)) & (2**64 - 1)
            out.append(parent)
        return out

    def store(self, tokens: list[int], start_block: int = 0, medium: str | None = "GPU") -> BlockStored:
        hs = self.hashes(tokens)
        n = len(hs)
        return BlockStored(tuple(hs[start_block:]), hs[start_block - 1] if start_block else None,
                           tuple(tokens[start_block * self.bs:n * self.bs]), self.bs, None, medium, self.lora)

    def remove(self, tokens: list[int], blocks: slice, medium: str | None = "GPU") -> BlockRemoved:
        return BlockRemoved(tuple(self.hashes(tokens)[blocks]), medium)


def prompt(n_blocks: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n_blocks * BS)]


@pytest.fixture
def index() -> BlockIndex:
    return BlockIndex(BlockKeyer(block_size=BS))


def test_stored_blocks_match_whatever_the_servers_hash_seed(index):
    p = prompt(6)
    index.apply("a", [FakeServer(1).store(p)], "m")
    index.apply("b", [FakeServer(2).store(p[:3 * BS])], "m")
    got = index.match(p + [7, 7], "m")
    assert got == {"a": PrefixMatch(6, 6, 0, 0), "b": PrefixMatch(3, 3, 0, 0)}
    assert index.match(p, "other-model") == {}
    assert index.match(prompt(6, seed=9), "m") == {}


def test_events_chain_through_parent_hashes(index):
    p, s = prompt(5), FakeServer(3)
    index.apply("a", [s.store(p[:2 * BS]), s.store(p, start_block=2)], "m")
    assert index.match(p, "m")["a"].blocks == 5
    # a child whose parent the endpoint never reported cannot be keyed: skipped, counted
    index.apply("b", [s.store(p, start_block=2)], "m")
    assert index.stats.unchained == 1 and "b" not in index.match(p, "m")


def test_removed_breaks_the_prefix_at_the_removed_block(index):
    p, s = prompt(6), FakeServer(4)
    index.apply("a", [s.store(p)], "m")
    index.apply("a", [s.remove(p, slice(3, 6))], "m")  # vLLM evicts tail first
    assert index.match(p, "m")["a"].blocks == 3
    index.apply("a", [s.remove(p, slice(0, 1))], "m")
    assert index.match(p, "m") == {}
    assert index.blocks_of("a") == 2 and len(index) == 2  # blocks 1, 2: still held, unreachable


def test_all_blocks_cleared_forgets_only_that_endpoint(index):
    p = prompt(4)
    index.apply("a", [FakeServer(1).store(p)], "m")
    index.apply("b", [FakeServer(2).store(p)], "m")
    index.apply("a", [AllBlocksCleared()], "m")
    assert set(index.match(p, "m")) == {"b"}
    assert index.blocks_of("a") == 0


def test_media_gpu_then_offloaded_to_cpu_then_gpu_evicted(index):
    p, s = prompt(4), FakeServer(5)
    index.apply("a", [s.store(p)], "m")
    # the offloading connector reports the same server blocks on CPU without tokens
    offload = BlockStored(tuple(s.hashes(p)[:2]), None, (), BS, None, "CPU")
    index.apply("a", [offload, s.remove(p, slice(0, 4), medium="GPU")], "m")
    assert index.match(p, "m") == {"a": PrefixMatch(2, 0, 2, 0)}
    index.apply("a", [s.remove(p, slice(0, 2), medium="CPU")], "m")
    assert index.match(p, "m") == {} and index.blocks_of("a") == 0 and len(index) == 0


def test_lora_seeded_keys_differ_from_the_base_model(index):
    p = prompt(3)
    index.apply("a", [FakeServer(1, lora="sql-adapter").store(p)], "base")
    assert index.match(p, "sql-adapter") == {"a": PrefixMatch(3, 3, 0, 0)}
    assert index.match(p, "base") == {}
    index.apply("b", [FakeServer(1).store(p)], "base")
    assert set(index.match(p, "base")) == {"b"}


def test_cache_salt_in_extra_keys_taints_the_keys(index):
    p, s = prompt(2), FakeServer(6, lora="ad")
    ev = s.store(p)
    salted = BlockStored(ev.block_hashes, None, ev.token_ids, BS, None, "GPU", "ad", (("ad", "salt-1"), ("ad",)))
    plain = BlockStored(ev.block_hashes, None, ev.token_ids, BS, None, "GPU", "ad", (("ad",), ("ad",)))
    index.apply("salted", [salted], "base")
    index.apply("plain", [plain], "base")
    assert set(index.match(p, "ad")) == {"plain"}  # the LoRA name alone is not a taint
    assert set(index.match(p, "ad", extras=[("salt-1",), None])) == {"salted"}


def test_unencodable_extra_keys_skip_the_event(index):
    p, s = prompt(2), FakeServer(9)
    ev = s.store(p)
    deep: object = None
    for _ in range(40):
        deep = [deep]
    index.apply("a", [BlockStored(ev.block_hashes, None, ev.token_ids, BS, extra_keys=((deep,), None))], "m")
    assert index.stats.mismatched == 1 and index.match(p, "m") == {}


def test_server_block_a_multiple_of_the_pickers_block(index):
    p, s = prompt(4), FakeServer(7, block_size=2 * BS)
    index.apply("a", [s.store(p)], "m")
    assert index.match(p, "m")["a"].blocks == 4
    index.apply("a", [s.remove(p, slice(1, 2))], "m")
    assert index.match(p, "m")["a"].blocks == 2
    index.apply("b", [FakeServer(8, block_size=BS + 1).store(prompt(2))], "m")
    assert index.stats.mismatched == 1


def test_server_blocks_smaller_than_the_pickers(index):
    """vLLM's 16-token blocks under the guide's blockSize 64: server blocks group into picker
    blocks; a removal inside a group breaks the prefix there; an event continuing from inside
    a group cannot be keyed, one continuing from a group's end chains."""
    p, s = prompt(4), FakeServer(7, block_size=BS // 2)  # 8 server blocks
    whole = s.store(p)
    index.apply("a", [whole], "m")
    assert index.match(p, "m")["a"].blocks == 4
    index.apply("a", [s.remove(p, slice(2, 3))], "m")  # the first half of picker block 1
    assert index.match(p, "m")["a"].blocks == 1
    hs = s.hashes(p)
    split = [BlockStored(tuple(hs[:4]), None, tuple(p[:4 * BS // 2]), BS // 2),
             BlockStored(tuple(hs[4:]), hs[3], tuple(p[4 * BS // 2:]), BS // 2)]
    index.apply("b", split, "m")
    assert index.match(p, "m")["b"].blocks == 4
    odd = [BlockStored(tuple(hs[:3]), None, tuple(p[:3 * BS // 2]), BS // 2),
           BlockStored(tuple(hs[3:]), hs[2], tuple(p[3 * BS // 2:]), BS // 2)]
    index.apply("c", odd, "m")
    assert index.match(p, "m")["c"].blocks == 1 and index.stats.unchained == 1
    index.apply("d", [BlockStored(tuple(hs[:1]), None, tuple(p[:BS // 2]), BS // 2)], "m")  # no whole picker block
    assert "d" not in index.match(p, "m") and index.stats.mismatched == 1


def test_other_kv_cache_groups_are_not_indexed(index):
    p = prompt(2)
    ev = FakeServer(1).store(p)
    index.apply("a", [BlockStored(ev.block_hashes, None, ev.token_ids, BS, group_idx=1)], "m")
    assert index.match(p, "m") == {} and index.stats.skipped_groups == 1


def test_endpoint_filter_and_removal(index):
    p = prompt(3)
    for name, seed in (("a", 1), ("b", 2)):
        index.apply(name, [FakeServer(seed).store(p)], "m")
    assert set(index.match(p, "m", endpoints=["b", "unknown"])) == {"b"}
    index.remove_endpoint("a")
    assert set(index.match(p, "m")) == {"b"} and index.endpoints == ["b"]
    index.apply("c", [FakeServer(3).store(p)], "m")  # reuses a's slot: nothing of a's leaks
    assert set(index.match(p, "m")) == {"b", "c"}


def test_eviction_keeps_the_index_under_its_bound():
    idx = BlockIndex(BlockKeyer(block_size=BS), max_blocks=10)
    hot = prompt(2, seed=100)
    idx.apply("a", [FakeServer(1).store(hot)], "m")
    for i in range(20):
        idx.apply("a", [FakeServer(1).store(prompt(1, seed=i))], "m")
        assert len(idx) <= 10
        assert idx.match(hot, "m")["a"].blocks == 2  # matched keys are refreshed in the LRU
    assert idx.stats.evictions == 12
    assert idx.match(prompt(1, seed=0), "m") == {}  # the oldest cold block went first


def test_an_endpoint_over_its_own_bound_is_cleared():
    idx = BlockIndex(BlockKeyer(block_size=BS), max_blocks_per_endpoint=5)
    idx.apply("a", [FakeServer(1).store(prompt(4))], "m")
    idx.apply("b", [FakeServer(2).store(prompt(3))], "m")
    idx.apply("a", [FakeServer(1).store(prompt(2, seed=1))], "m")
    assert idx.stats.overflows == 1 and idx.blocks_of("a") == 0 and idx.blocks_of("b") == 3


def test_speculative_entries_expire_unless_confirmed():
    now = [0.0]
    idx = BlockIndex(BlockKeyer(block_size=BS), speculative_ttl=2.0, clock=lambda: now[0])
    p, q = prompt(3, seed=1), prompt(3, seed=2)
    idx.speculate("a", idx.keyer.keys(p, "m"))
    idx.speculate("a", idx.keyer.keys(q, "m"))
    assert idx.match(p, "m") == {"a": PrefixMatch(3, 0, 0, 3)}
    idx.apply("a", [FakeServer(1).store(q[:2 * BS])], "m")  # the server confirms 2 of q's blocks
    assert idx.match(q, "m") == {"a": PrefixMatch(3, 2, 0, 1)}
    now[0] = 1.9
    assert idx.match(p, "m")["a"].blocks == 3
    now[0] = 2.0
    assert idx.match(p, "m") == {}
    assert idx.match(q, "m") == {"a": PrefixMatch(2, 2, 0, 0)}
    assert idx.stats.speculative_expired == 6  # the marks expire; what the server confirmed stays


def test_a_later_speculation_extends_an_earlier_one():
    now = [0.0]
    idx = BlockIndex(BlockKeyer(block_size=BS), speculative_ttl=2.0, clock=lambda: now[0])
    keys = idx.keyer.keys(prompt(2), "m")
    idx.speculate("a", keys)
    now[0] = 1.5
    idx.speculate("a", keys)
    now[0] = 2.5
    assert idx.match_keys(keys)["a"].blocks == 2
    now[0] = 3.5
    assert idx.match_keys(keys) == {}


def test_speculation_is_bounded():
    idx = BlockIndex(BlockKeyer(block_size=BS), max_speculative_blocks=4, clock=lambda: 0.0)
    first, second = idx.keyer.keys(prompt(3, seed=1), "m"), idx.keyer.keys(prompt(3, seed=2), "m")
    idx.speculate("a", first)
    idx.speculate("a", second)
    assert idx.match_keys(first) == {} and idx.match_keys(second)["a"].blocks == 3
    assert len(idx) == 3


def test_uncached_lookup_computes_one_key():
    idx = BlockIndex(BlockKeyer(block_size=BS))
    idx.apply("a", [FakeServer(1).store(prompt(2))], "m")
    pulled = []

    def keys():
        for k in idx.keyer.iter_keys(prompt(50, seed=3), "m"):
            pulled.append(k)
            yield k
    assert idx.match_keys(keys()) == {} and len(pulled) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 5), st.integers(1, 6), st.booleans()),
                max_size=40))
def test_lookup_agrees_with_a_brute_force_model(ops):
    """Random stores and tail removals on three endpoints over six prompts sharing a
    prefix; the index's match equals the longest prefix each endpoint holds."""
    idx = BlockIndex(BlockKeyer(block_size=BS))
    base = prompt(3, seed=99)
    prompts = [base + prompt(3, seed=i) for i in range(6)]
    servers = {e: FakeServer(seed) for seed, e in enumerate("abc")}
    held: dict[str, set[tuple[int, ...]]] = {e: set() for e in "abc"}  # held block-prefixes
    for endpoint, pi, n, remove in ops:
        p, s = prompts[pi], servers[endpoint]
        if remove:
            idx.apply(endpoint, [s.remove(p, slice(n - 1, 6))], "m")
            held[endpoint] -= {tuple(p[:(b + 1) * BS]) for b in range(n - 1, 6)}
        else:
            idx.apply(endpoint, [s.store(p[:n * BS])], "m")
            held[endpoint] |= {tuple(p[:(b + 1) * BS]) for b in range(n)}
    for p in prompts:
        want = {}
        for e in "abc":
            n = 0
            while n < 6 and tuple(p[:(n + 1) * BS]) in held[e]:
                n += 1
            if n:
                want[e] = n
        assert {e: m.blocks for e, m in idx.match(p, "m").items()} == want


def test_holders_per_key_are_an_lru_by_last_store():
    """max_holders_per_key (inMemoryConfig.podCacheSize): a key keeps its most recently
    stored entries; a GPU and a CPU copy on one endpoint are two entries, as in the reference."""
    idx = BlockIndex(BlockKeyer(block_size=BS), max_holders_per_key=2)
    p = prompt(2)
    idx.apply("a", [FakeServer(1).store(p)], "m")
    idx.apply("b", [FakeServer(2).store(p)], "m")
    idx.apply("c", [FakeServer(3).store(p)], "m")  # a's entries are the least recently stored: dropped
    assert set(idx.match(p, "m")) == {"b", "c"} and idx.stats.holder_evictions == 2
    idx.apply("b", [FakeServer(2).store(p)], "m")  # stored again: b is now the most recent
    idx.apply("a", [FakeServer(1).store(p, medium="CPU")], "m")  # c goes, not b
    assert idx.match(p, "m") == {"a": PrefixMatch(2, 0, 2, 0), "b": PrefixMatch(2, 2, 0, 0)}
    idx.apply("b", [FakeServer(2).store(p, medium="CPU")], "m")  # b's CPU entry pushes out its older GPU one
    assert idx.match(p, "m") == {"a": PrefixMatch(2, 0, 2, 0), "b": PrefixMatch(2, 0, 2, 0)}
    idx.apply("b", [FakeServer(2).remove(p, slice(0, 2), medium="CPU")], "m")
    assert idx.match(p, "m") == {"a": PrefixMatch(2, 0, 2, 0)}
    assert not idx._order  # noqa: SLF001 - no key has two entries left, so no order is kept


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["GPU", "CPU"]), st.integers(0, 2),
                          st.integers(1, 4), st.booleans()), max_size=40))
def test_holder_bound_agrees_with_a_per_key_lru_model(ops):
    """Random stores and removals on four endpoints and two tiers with three entries per
    key: each endpoint's match is the longest prefix of keys whose LRU still holds it."""
    from collections import OrderedDict

    idx = BlockIndex(BlockKeyer(block_size=BS), max_holders_per_key=3)
    base = prompt(2, seed=77)
    prompts = [base + prompt(2, seed=i) for i in range(3)]
    servers = {e: FakeServer(seed) for seed, e in enumerate("abcd")}
    lru: dict[tuple[int, ...], OrderedDict] = {}
    for endpoint, medium, pi, n, remove in ops:
        p, s = prompts[pi], servers[endpoint]
        blocks = [tuple(p[:(b + 1) * BS]) for b in range(n)]
        if remove:
            idx.apply(endpoint, [s.remove(p, slice(0, n), medium)], "m")
            for k in blocks:
                lru.get(k, OrderedDict()).pop((endpoint, medium), None)
        else:
            idx.apply(endpoint, [s.store(p[:n * BS], medium=medium)], "m")
            for k in blocks:
                entries = lru.setdefault(k, OrderedDict())
                entries[(endpoint, medium)] = None
                entries.move_to_end((endpoint, medium))
                if len(entries) > 3:
                    entries.popitem(last=False)
    for p in prompts:
        want = {}
        for e in "abcd":
            n = 0
            while n < 4 and any(h == e for h, _ in lru.get(tuple(p[:(n + 1) * BS]), ())):
                n += 1
            if n:
                want[e] = n
        assert {e: m.blocks for e, m in idx.match(p, "m").items()} == want


def test_weighted_counts_each_block_at_its_best_tier():
    """LongestPrefixScorer: per block the highest weight among the tiers holding it."""
    now = [0.0]
    idx = BlockIndex(BlockKeyer(block_size=BS), clock=lambda: now[0])
    p = prompt(4)
    idx.apply("a", [FakeServer(1).store(p[:2 * BS], medium="CPU")], "m")
    idx.speculate("a", idx.keyer.keys(p, "m"))  # blocks 0-1 on CPU and speculative, 2-3 speculative
    m = idx.match(p, "m")["a"]
    assert m == PrefixMatch(4, 0, 2, 2)  # Explain's exclusive counts
    assert m.weighted(1.0, 0.8, 1.0) == 4.0  # CPU + speculative counts 1.0, as the reference
    ten_cpu = PrefixMatch(10, 0, 10, 0, bytes([2] * 10))
    assert ten_cpu.weighted(1.0, 0.8, 1.0) == 7.999999999999999  # 0.8 added ten times, as Go does: int() is 7
    assert m.weighted(1.0, 2.0, 1.0) == 6.0  # whichever tier weighs more
    assert PrefixMatch(3, 1, 1, 1).weighted(1.0, 0.5, 0.25) == 1.75  # built without tiers
    # per tier, the leading blocks held there with no gap, while some tier holds them all
    assert m.by_tier() == {"cpu": 2, "speculative": 4}
    assert PrefixMatch(3, 1, 2, 0, bytes([1, 2, 2])).by_tier() == {"gpu": 1}  # no tier holds blocks 0-1: stop
    assert PrefixMatch(3, 1, 2, 0, bytes([3, 2, 2])).by_tier() == {"gpu": 1, "cpu": 3}
