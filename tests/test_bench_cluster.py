"""The virtual-time cluster simulation: determinism under a seed, and that routing shows."""

from __future__ import annotations

from bench.cluster import ClusterConfig, _Prompts, simulate
from bench.workloads import LoadSpec, generate, parse_workload
from simulator.engine import EngineConfig
from simulator.tokenizer import apply_chat_template, encode


def shared_prefix(n: int = 120, groups: int = 6, rate: float = 60.0, seed: int = 1):
    spec = parse_workload({"workload": {"type": "shared_prefix", "num_groups": groups, "num_prompts_per_group": 4,
                                        "system_prompt_len": 1500, "question_len": 30, "output_len": 16},
                           "num_requests": n, "seed": seed, "load": {"rate": rate}})
    return spec, generate(spec)


def fingerprint(r):
    return ([(x.index, x.start, x.ttft, x.e2e, x.cached_tokens, x.status) for x in r.results], r.per_server,
            r.hit_rate)


def test_same_seed_same_run_for_every_strategy():
    spec, items = shared_prefix()
    for strategy in ("picker", "random", "oracle", "least-queue"):
        a = simulate(strategy, items, spec.load, ClusterConfig(servers=4, seed=5))
        b = simulate(strategy, items, spec.load, ClusterConfig(servers=4, seed=5))
        assert fingerprint(a) == fingerprint(b), strategy
        assert len(a.results) == len(items) and all(x.ok for x in a.results)
    c = simulate("random", items, spec.load, ClusterConfig(servers=4, seed=6))
    assert c.per_server != simulate("random", items, spec.load, ClusterConfig(servers=4, seed=5)).per_server


def test_prefix_aware_routing_beats_round_robin():
    spec, items = shared_prefix(n=200, groups=8, rate=80.0)
    cfg = ClusterConfig(servers=4)
    rr = simulate("round-robin", items, spec.load, cfg)
    picker = simulate("picker", items, spec.load, cfg)
    oracle = simulate("oracle", items, spec.load, cfg)
    assert rr.per_server == [50, 50, 50, 50]
    assert picker.hit_rate > rr.hit_rate + 0.1
    assert oracle.hit_rate > rr.hit_rate + 0.1
    assert picker.summary().ttft_p90 < rr.summary().ttft_p90
    # cached tokens reported per request come from the engine
    assert sum(x.cached_tokens for x in picker.results) > sum(x.cached_tokens for x in rr.results)


def test_time_scale_and_gateway_latency():
    spec, items = shared_prefix(n=30, rate=2.0)
    base = simulate("round-robin", items, spec.load, ClusterConfig(servers=2))
    slow = simulate("round-robin", items, LoadSpec(rate=0.2), ClusterConfig(servers=2), time_scale=0.1)
    # Rate 0.2/s at time-scale 0.1 is the same virtual arrival process as 2/s at 1.0.
    assert [x.start for x in slow.results] == [x.start for x in base.results]
    late = simulate("round-robin", items, spec.load, ClusterConfig(servers=2, gateway_latency=0.25))
    for a, b in zip(base.results, late.results, strict=True):
        assert b.ttft >= a.ttft + 0.25 - 1e-9


def test_closed_loop_multi_turn_and_lora():
    spec = parse_workload({"workload": {"type": "multi_turn", "num_sessions": 4, "turns": 3, "system_prompt_len": 300,
                                        "user_len": 30, "output_len": 8}, "num_requests": 12,
                           "load": {"type": "concurrency", "concurrency": 3}})
    items = generate(spec)
    r = simulate("picker", items, spec.load, ClusterConfig(servers=2))
    assert all(x.ok for x in r.results)
    by_index = {x.index: x for x in r.results}
    for it in items:
        if it.turn:
            prev = next(p for p in items if p.session == it.session and p.turn == it.turn - 1)
            assert by_index[it.index].start >= by_index[prev.index].start + by_index[prev.index].e2e - 1e-9
    lora = parse_workload({"workload": {"type": "lora_mix", "adapters": {"a": 1, "b": 1, "": 1}, "prompt_len": 50,
                                        "output_len": 4}, "num_requests": 30, "load": {"rate": 20}})
    r = simulate("picker", generate(lora), lora.load, ClusterConfig(servers=2, engine=EngineConfig(max_loras=1)))
    assert all(x.ok for x in r.results) and sum(r.per_server) == 30


def test_prompt_cache_matches_the_tokenizer():
    spec = parse_workload({"workload": {"type": "multi_turn", "num_sessions": 2, "turns": 3}, "num_requests": 6})
    prompts = _Prompts(16, spec.model)
    for it in generate(spec):
        assert prompts.token_ids(it.messages) == encode(apply_chat_template(it.messages))


def test_recommended_config_releases_every_in_flight_request():
    """The simulation keeps in-flight counts as the director does: after the run, every
    request routed has been released again."""
    spec, items = shared_prefix(n=150, groups=6, rate=80.0)
    result = simulate("picker:bench/examples/recommended-config.yaml", items, spec.load, ClusterConfig(servers=4))
    assert all(x.ok for x in result.results)
    assert result.in_flight_at_end == 0
    assert max(result.per_server) < len(items)  # it did route (not everything on one server)
