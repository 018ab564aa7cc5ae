"""Block keys: llm-d-kv-cache's FNV-1a/CBOR chain reproduced byte for byte, the fast chain,
and the properties both must have (prefix-stable, chained, seeded by model and LoRA)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datalayer.kvevents import ALGORITHMS, BlockKeyer
from epp.datalayer.kvevents.keys import cbor, fnv1a64


def test_fnv1a64_reference_vectors():
    # from the FNV reference (isthe.com/chongo/tech/comp/fnv), 64-bit FNV-1a
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (23, "17"), (24, "1818"), (1000, "1903e8"), (1000000, "1a000f4240"),
    (2**64 - 1, "1bffffffffffffffff"), (-1, "20"), (-1000, "3903e7"), (None, "f6"), (True, "f5"),
    ("a", "6161"), ("IETF", "6449455446"), (b"\x01\x02", "420102"), ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"), ({"b": 1, "a": 2}, "a2616102616201"),
    ({"aa": 1, "b": 2}, "a2616202626161" + "01"), (1.1, "fb3ff199999999999a"),
])
def test_cbor_matches_rfc_8949_examples(value, encoded):
    assert cbor(value).hex() == encoded


def test_fnv_chain_is_llm_d_kv_cache_s():
    """TokensToKVBlockKeys: init = FNV(seed); root = FNV(CBOR([init, nil, model]));
    key = FNV(CBOR([parent, tokens, nil])) (pkg/kvcache/kvblock/token_processor.go)."""
    keyer = BlockKeyer(block_size=4, hash_seed="s", algorithm="fnv64a-cbor")
    init = fnv1a64(b"s")
    root = fnv1a64(bytes.fromhex("83") + bytes.fromhex("1b") + init.to_bytes(8, "big") + bytes.fromhex("f6")
                   + bytes.fromhex("656d6f64656c"))  # "model"
    assert keyer.root("model") == root
    tokens = [1, 30, 300, 70000, 5, 6, 7, 8, 9]
    k0 = fnv1a64(bytes.fromhex("831b") + root.to_bytes(8, "big") + bytes.fromhex("84" "01" "181e" "19012c" "1a00011170" "f6"))
    k1 = fnv1a64(bytes.fromhex("831b") + k0.to_bytes(8, "big") + bytes.fromhex("84" "05" "06" "07" "08" "f6"))
    assert keyer.keys(tokens, "model") == [k0, k1]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chain_properties(algorithm):
    k = BlockKeyer(block_size=4, algorithm=algorithm)
    t = list(range(100, 117))  # 4 full blocks and one token
    keys = k.keys(t, "m")
    assert len(keys) == 4 and len(set(keys)) == 4
    assert k.keys(t[:8], "m") == keys[:2]  # a prefix's keys are the prefix of the keys
    assert k.keys(t[4:], "m", parent=keys[0]) == keys[1:]  # continuing a chain
    assert k.keys(t[:3], "m") == []
    assert k.keys(t, "lora-a")[0] != keys[0] and k.keys(t, "lora-b")[0] != k.keys(t, "lora-a")[0]
    assert BlockKeyer(block_size=4, hash_seed="x", algorithm=algorithm).keys(t, "m")[0] != keys[0]
    assert k.keys([100, 101, 102, 999] + t[4:], "m")[1] != keys[1]  # a change propagates down the chain
    salted = k.keys(t, "m", extras=[("salt",), None, None, None])
    assert salted[0] != keys[0] and salted[1] != keys[1]
    assert k.keys(t, "m", extras=[None] * 4) == keys


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lazy_keys_are_the_same_keys(algorithm):
    k = BlockKeyer(block_size=2, algorithm=algorithm)
    it = k.iter_keys(list(range(10)), "m")
    first = next(it)
    assert [first, *it] == k.keys(list(range(10)), "m")


def test_bad_configuration_and_tokens_are_refused():
    for kwargs in ({"block_size": 0}, {"block_size": -4}, {"block_size": 1.5}, {"algorithm": "sha1"}):
        with pytest.raises(ValueError):
            BlockKeyer(**kwargs)
    with pytest.raises(ValueError):
        BlockKeyer(block_size=1).keys([2**32], "m")
    with pytest.raises(ValueError):
        BlockKeyer(block_size=1).keys([1, 2], "m", extras=[None])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=64), st.integers(1, 8), st.text(max_size=8))
def test_block_keys_depend_only_on_the_prefix(tokens, bs, model):
    for algorithm in ALGORITHMS:
        k = BlockKeyer(block_size=bs, algorithm=algorithm)
        keys = k.keys(tokens, model)
        assert len(keys) == len(tokens) // bs
        for i in range(len(keys)):
            assert k.keys(tokens[:(i + 1) * bs], model) == keys[:i + 1]
