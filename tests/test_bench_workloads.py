"""Workload generators: sharing structure, lengths, seeds, and YAML errors naming the key."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.workloads import (
    WorkloadError,
    arrival_times,
    generate,
    load_workload_file,
    make_text,
    parse_workload,
)
from simulator.tokenizer import apply_chat_template, encode


def ntok(text: str) -> int:
    return len(encode(text))


def test_make_text_has_exact_token_count():
    rng = random.Random(7)
    for n in (1, 2, 3, 17, 100, 2000):
        assert ntok(make_text(rng, n)) == n


def test_shared_prefix_structure_and_lengths():
    spec = parse_workload("""
workload: {type: shared_prefix, num_groups: 4, num_prompts_per_group: 5, system_prompt_len: 300,
           question_len: 20, output_len: 33}
num_requests: 200
seed: 11
""")
    items = generate(spec)
    assert len(items) == 200
    systems: dict[int, set[str]] = {}
    questions: dict[int, set[str]] = {}
    for it in items:
        sys_msg, user = it.messages
        assert sys_msg["role"] == "system" and user["role"] == "user"
        systems.setdefault(it.group, set()).add(sys_msg["content"])
        questions.setdefault(it.group, set()).add(user["content"])
        assert it.max_tokens == 33 and it.body()["max_tokens"] == 33
        assert ntok(user["content"]) == 20
        # system prompt: the group's label plus system_prompt_len tokens of text
        assert 300 <= ntok(sys_msg["content"]) <= 306
    assert sorted(systems) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in systems.values())  # one system prompt per group
    assert len({next(iter(v)) for v in systems.values()}) == 4  # distinct across groups
    assert all(len(v) <= 5 for v in questions.values())
    counts = Counter(it.group for it in items)
    assert min(counts.values()) > 25  # uniform draw over groups
    # Requests of one group share their leading KV blocks (same token prefix).
    group0 = [it for it in items if it.group == 0]
    a = group0[0]
    b = next(it for it in group0 if it.messages[1] != a.messages[1])
    ta, tb = encode(apply_chat_template(a.messages)), encode(apply_chat_template(b.messages))
    common = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y)
    assert common >= 300


def test_same_seed_same_items_other_seed_differs():
    raw = {"workload": {"type": "shared_prefix", "num_groups": 2, "system_prompt_len": 50}, "num_requests": 20}
    one, two = generate(parse_workload(raw)), generate(parse_workload(raw))
    assert [i.messages for i in one] == [i.messages for i in two]
    other = generate(parse_workload({**raw, "seed": 2}))
    assert [i.messages for i in one] != [i.messages for i in other]


def test_multi_turn_history_grows():
    spec = parse_workload({"workload": {"type": "multi_turn", "num_sessions": 3, "turns": 4, "system_prompt_len": 40,
                                        "user_len": 10, "output_len": 12}, "num_requests": 12})
    items = generate(spec)
    assert len(items) == 12
    by_session: dict[int, list] = {}
    for it in items:
        by_session.setdefault(it.session, []).append(it)
    assert sorted(by_session) == [0, 1, 2]
    for turns in by_session.values():
        assert [t.turn for t in turns] == [0, 1, 2, 3]  # in order within the session
        for prev, cur in zip(turns, turns[1:], strict=False):
            # each turn's messages = previous turn's + assistant reply + new user message
            assert cur.messages[:len(prev.messages)] == prev.messages
            assert [m["role"] for m in cur.messages[len(prev.messages):]] == ["assistant", "user"]
            assert ntok(cur.messages[-2]["content"]) == 12 and ntok(cur.messages[-1]["content"]) == 10


def test_lora_mix_follows_weights():
    spec = parse_workload({"workload": {"type": "lora_mix", "adapters": {"a": 3, "b": 1}, "prompt_len": 8,
                                        "output_len": 4}, "num_requests": 2000, "model": "base"})
    counts = Counter(it.model for it in generate(spec))
    assert set(counts) == {"a", "b"}
    assert 0.70 < counts["a"] / 2000 < 0.80
    base = parse_workload({"workload": {"type": "lora_mix", "adapters": {"": 1}}, "num_requests": 3, "model": "base"})
    assert {it.model for it in generate(base)} == {"base"}


def test_random_lengths_in_range():
    spec = parse_workload({"workload": {"type": "random", "min_prompt_len": 10, "max_prompt_len": 40,
                                        "min_output_len": 3, "max_output_len": 9}, "num_requests": 100})
    items = generate(spec)
    lens = [ntok(it.messages[0]["content"]) for it in items]
    assert min(lens) >= 10 and max(lens) <= 40 and len(set(lens)) > 10
    assert all(3 <= it.max_tokens <= 9 for it in items)


def test_poisson_arrivals_rate_and_seed():
    ts = arrival_times(5000, 50.0, seed=4)
    assert ts[0] == 0 and ts == sorted(ts)
    assert 5000 / ts[-1] == pytest.approx(50.0, rel=0.05)
    assert ts == arrival_times(5000, 50.0, seed=4)


@pytest.mark.parametrize("raw, message", [
    ({"workload": {"type": "nope"}}, "workload.type"),
    ({"workload": {"num_groups": "x"}}, "workload.num_groups"),
    ({"workload": {"num_grups": 3}}, "workload.num_grups"),
    ({"load": {"type": "burst"}}, "load.type"),
    ({"load": {"rate": "fast"}}, "load.rate"),
    ({"num_requests": 0}, "num_requests"),
    ({"extra": 1}, "extra"),
    ({"workload": {"type": "random", "min_prompt_len": -1}}, "workload.min_prompt_len"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(WorkloadError, match=message.replace(".", r"\.")):
        parse_workload(raw)


def test_workload_file(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("workload: {type: random}\nnum_requests: 3\nload: {type: concurrency, concurrency: 2}\n")
    spec = load_workload_file(str(p))
    assert spec.load.type == "concurrency" and spec.load.concurrency == 2 and spec.num_requests == 3
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload_file(str(tmp_path / "missing.yaml"))
    p.write_text("workload: [unclosed")
    with pytest.raises(WorkloadError, match="YAML"):
        load_workload_file(str(p))


def test_example_files_parse():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parent.parent / "bench/examples").glob("*.yaml"))
    # The picker configs that sit beside the workloads (e.g. recommended-config.yaml) are not workloads.
    examples = [p for p in examples if "kind: EndpointPickerConfig" not in p.read_text()]
    assert {load_workload_file(str(p)).type for p in examples} == {"shared_prefix", "multi_turn", "lora_mix", "random"}
