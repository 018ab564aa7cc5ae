"""P/D disaggregation in the virtual-time cluster simulation and the `epp bench pd` benchmark."""

from __future__ import annotations

import dataclasses

import pytest

from bench.cli import main
from bench.cluster import PD_CONFIG, ClusterConfig, parse_split, pd_setups, simulate
from bench.workloads import LoadSpec, generate, parse_workload
from epp.framework.types import ROLE_LABEL
from simulator.engine import EngineConfig
from simulator.tokenizer import apply_chat_template, encode

PD = f"picker:{PD_CONFIG}"
ROLES = ("prefill", "decode", "decode")


def long_prompts(n: int = 300, seed: int = 1, **over):
    w = {"type": "long_prompt", "num_groups": 4, "shared_prefix_len": 500, "min_prompt_len": 1500,
         "max_prompt_len": 3000, "min_output_len": 20, "max_output_len": 60, **over}
    return generate(parse_workload({"workload": w, "num_requests": n, "seed": seed}))


def fingerprint(r):
    return ([(x.index, x.start, x.ttft, x.e2e, x.cached_tokens, x.status, tuple(x.itl)) for x in r.results],
            r.per_server, r.pd)


def test_long_prompt_workload_shape_and_seed():
    items = long_prompts(50)
    assert items == long_prompts(50) and items != long_prompts(50, seed=2)
    systems = {it.messages[0]["content"] for it in items}
    assert 1 < len(systems) <= 4  # shared prefixes
    for it in items:
        n = len(encode(apply_chat_template(it.messages)))
        assert 1500 <= n <= 3000 + 40  # + the chat template's and group header's tokens
        assert 20 <= it.max_tokens <= 60
    with pytest.raises(ValueError, match="shared_prefix_len"):
        long_prompts(5, shared_prefix_len=2000)


def test_pd_requests_use_both_roles_and_none_is_lost():
    items = long_prompts()
    r = simulate(PD, items, LoadSpec(rate=6.0), ClusterConfig(servers=3, roles=ROLES, token_itl=True))
    n = len(items)
    assert len(r.results) == n and all(x.ok for x in r.results) and r.in_flight_at_end == 0
    assert r.pd.requests == n and r.pd.local_fallbacks == 0  # every prompt has >= 1024 uncached tokens
    # the prefill server prefilled every request and decoded none; decode servers the reverse
    assert r.pd.by_role[0] == {"prefill": n, "decode": 0, "both": 0}
    assert r.per_server[0] == 0 and sum(r.per_server[1:]) == n
    assert [w["decode"] for w in r.pd.by_role[1:]] == r.per_server[1:]
    assert all(w["prefill"] == 0 and w["both"] == 0 for w in r.pd.by_role[1:])
    # decoders computed one prompt token per request (the one vLLM recomputes) and pulled the rest
    for w, src in zip(r.pd.by_role[1:], r.pd.prompt_tokens_by_source[1:], strict=True):
        assert src["local_compute"] == w["decode"] and src["external_kv_transfer"] > 0
    # the KV pulled: every prompt token the decoders did not find cached (the last one is pulled, then recomputed)
    pulled = sum(s["external_kv_transfer"] + s["local_compute"] for s in r.pd.prompt_tokens_by_source[1:])
    assert r.pd.kv_bytes == pulled * EngineConfig().kv_bytes_per_token
    # usage reports the prefiller's cached tokens: the shared prefixes hit on the prefill server
    assert sum(x.cached_tokens for x in r.results) == r.pd.prompt_tokens_by_source[0]["local_cache_hit"] > 0
    # every token after the first is an ITL sample
    assert all(len(x.itl) == x.output_tokens - 1 for x in r.results)


def test_aggregated_default_config_never_disaggregates():
    items = long_prompts(60)
    r = simulate("picker", items, LoadSpec(rate=6.0), ClusterConfig(servers=3, roles=("both",) * 3))
    assert r.pd.requests == 0 and sum(w["both"] for w in r.pd.by_role) == 60
    assert all(w["prefill"] == 0 and w["decode"] == 0 for w in r.pd.by_role)


def test_ttft_includes_the_kv_transfer():
    items = long_prompts(30)
    load = LoadSpec(rate=0.5)  # one at a time: no queueing, so TTFTs differ by the transfers alone

    def run(bandwidth: float):
        cfg = ClusterConfig(servers=3, roles=ROLES, engine=dataclasses.replace(EngineConfig(),
                                                                               kv_transfer_bandwidth=bandwidth))
        return simulate(PD, items, load, cfg)

    fast, slow = run(1e12), run(1e9)
    assert slow.pd.kv_bytes == fast.pd.kv_bytes > 0
    extra = sum(x.ttft for x in slow.results) - sum(x.ttft for x in fast.results)
    transfer = slow.pd.kv_bytes / 1e9 - fast.pd.kv_bytes / 1e12
    assert extra == pytest.approx(transfer, rel=0.05)
    # and the P queue and prefill: a P/D TTFT is at least its prompt's uncached prefill time
    cfg = EngineConfig()
    for x in fast.results:
        assert x.ttft >= (x.prompt_tokens - x.cached_tokens - cfg.block_size) * cfg.prefill_time_per_token


def test_pd_runs_are_deterministic_under_a_seed():
    items = long_prompts(120)
    cfg = ClusterConfig(servers=4, roles=("prefill", "prefill", "decode", "decode"), seed=3, token_itl=True)
    a = simulate(PD, items, LoadSpec(rate=8.0), cfg)
    b = simulate(PD, items, LoadSpec(rate=8.0), cfg)
    assert fingerprint(a) == fingerprint(b)
    assert a.pd.by_role[0]["prefill"] > 0 and a.pd.by_role[1]["prefill"] > 0  # both prefill servers used


def test_roles_label_the_endpoints_and_bad_roles_are_refused():
    cfg = ClusterConfig(servers=2, roles=("prefill", "decode"), hardware=("a100", "h100"))
    assert cfg.labels(0)[ROLE_LABEL] == "prefill" and cfg.labels(1)["llm-d.ai/accelerator-variant"] == "h100"
    assert cfg.engine_configs()[0].prefill_time_per_token > cfg.engine_configs()[1].prefill_time_per_token
    with pytest.raises(ValueError, match="roles: 1 given for 2 servers"):
        ClusterConfig(servers=2, roles=("decode",))
    with pytest.raises(ValueError, match="unknown 'encode'"):
        ClusterConfig(servers=1, roles=("encode",))
    assert parse_split("1:3", 4) == (1, 3)
    for bad in ("4:0", "1:2", "x", "1-3"):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad, 4)
    setups = pd_setups(4, ["1:3", "2:2"])
    assert [s.name for s in setups] == ["aggregated", "P/D 1:3", "P/D 2:2"]
    assert setups[1].roles == ("prefill", "decode", "decode", "decode")


def test_pd_command_writes_results(tmp_path, capsys):
    argv = ["pd", "--servers", "3", "--splits", "1:2", "--rates", "3,6", "--requests", "40", "--shared-prefix-len",
            "500", "--min-prompt-len", "1500", "--max-prompt-len", "2500", "--min-output-len", "10",
            "--max-output-len", "30", "--out", str(tmp_path)]
    assert main(argv) == 0
    md = (tmp_path / "pd.md").read_text()
    assert "aggregated TTFT p90 ms" in md and "P/D 1:2 ITL p90 ms" in md and "P/D 1:2 vs aggregated" in md
    assert "40/0/0 0/" in md  # the prefill server prefilled all 40 requests at each rate
    assert (tmp_path / "pd_latency_vs_rate.png").stat().st_size > 1000
    first = md.split("Date:")[1].split("\n", 1)[1]
    assert main(argv) == 0
    assert (tmp_path / "pd.md").read_text().split("Date:")[1].split("\n", 1)[1] == first  # same seed, same tables
    capsys.readouterr()


def test_pd_command_refuses_a_bad_split(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pd", "--splits", "3:3", "--out", str(tmp_path)])
    assert e.value.code == 2 and "split '3:3'" in capsys.readouterr().err


def test_cluster_command_takes_roles(tmp_path, capsys):
    argv = ["cluster", "--servers", "2", "--roles", "prefill,decode", "--config", PD_CONFIG, "--strategies", "",
            "--rates", "10", "--requests", "20", "--groups", "2", "--out", str(tmp_path), "--no-plots"]
    assert main(argv) == 0
    row = next(line for line in (tmp_path / "cluster.md").read_text().splitlines() if line.startswith("| picker:"))
    assert row.rstrip(" |").endswith("0 20")  # the decode server is every request's target
    with pytest.raises(SystemExit):
        main(["cluster", "--servers", "3", "--roles", "prefill,decode", "--out", str(tmp_path)])
    assert "roles: 2 given for 3 servers" in capsys.readouterr().err
