"""P/D disaggregation and hardware classes in the engine model, in virtual time (no
sockets): the prefill side keeps its blocks for the decoder until released or expired;
the decode side pulls the prompt's KV in bytes / bandwidth and computes one prompt token,
not the prompt; transfers into one engine share its link; presets order step times."""

from __future__ import annotations

import pytest

from simulator import Engine, EngineConfig, EngineLoop, EngineRequest, VirtualClock
from simulator.hardware import HARDWARE, engine_config

BPT = 2 * 32 * 8 * 128 * 2  # KV bytes per token of the default model (Llama-3.1-8B, bf16)


def tokens(n: int, seed: int = 1) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 + 10 for i in range(n)]


class Run:
    """One engine on a virtual clock, recording each request's events."""

    def __init__(self, **cfg) -> None:
        self.clock = VirtualClock()
        self.engine = Engine(EngineConfig(**cfg))
        self.loop = EngineLoop(self.engine, self.clock)
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.loaded: dict[str, tuple[float, int, float]] = {}

    def submit(self, rid: str, prompt: list[int], max_tokens: int, at: float = 0.0, **kw) -> EngineRequest:
        req = EngineRequest(rid, prompt, max_tokens,
                            on_first_token=lambda t, _c: self.first.setdefault(rid, t),
                            on_finish=lambda t, _r: self.done.setdefault(rid, t),
                            on_kv_loaded=lambda t, b, d: self.loaded.setdefault(rid, (t, b, d)), **kw)
        self.clock.call_at(at, lambda: self.loop.submit(req))
        return req


def test_decode_side_pulls_the_prompt_in_bytes_over_bandwidth_and_computes_one_token():
    bw = 10e9
    r = Run(kv_transfer_bandwidth=bw)
    n = 4000
    r.submit("d", tokens(n), max_tokens=8, remote_prefill=True)
    r.clock.run_until_idle()
    t_loaded, nbytes, seconds = r.loaded["d"]
    assert nbytes == n * BPT and seconds == pytest.approx(n * BPT / bw)
    assert t_loaded == pytest.approx(n * BPT / bw)
    cfg = r.engine.config
    # The first step after the load computes the one last prompt token, not 4,000.
    assert r.first["d"] == pytest.approx(t_loaded + cfg.step_overhead + cfg.prefill_time_per_token)
    s = r.engine.stats()
    assert s.prompt_tokens_by_source == {"local_compute": 1, "local_cache_hit": 0, "external_kv_transfer": n - 1}
    assert s.remote_prefills_total == 1 and s.kv_bytes_received_total == n * BPT
    assert s.requests_by_role == {"both": 0, "prefill": 0, "decode": 1}
    assert s.generation_tokens_total == 8 and s.kv_cache_usage_perc == 0


def test_aggregated_prefill_of_the_same_prompt_costs_the_whole_prompt():
    r = Run()
    n = 4000
    r.submit("a", tokens(n), max_tokens=8)
    r.clock.run_until_idle()
    assert r.engine.stats().prompt_tokens_by_source["local_compute"] == n
    assert not r.loaded and r.engine.stats().remote_prefills_total == 0


@pytest.mark.parametrize("n,bw", [(1000, 40e9), (2000, 40e9), (2000, 20e9), (8000, 5e9)])
def test_transfer_time_scales_with_prompt_length_and_inverse_bandwidth(n, bw):
    r = Run(kv_transfer_bandwidth=bw)
    r.submit("d", tokens(n), max_tokens=1, remote_prefill=True, at=1.0)
    r.clock.run_until_idle()
    t, nbytes, seconds = r.loaded["d"]
    assert nbytes == n * BPT
    assert seconds == pytest.approx(n * BPT / bw, rel=1e-12)
    assert t == pytest.approx(1.0 + seconds)


def test_locally_cached_prefix_is_not_pulled_again():
    r = Run()
    shared = tokens(1600, seed=3)
    r.submit("warm", shared + tokens(10, seed=4), max_tokens=1)
    r.clock.run_until_idle()
    r.submit("d", shared + tokens(400, seed=5), max_tokens=1, remote_prefill=True, at=r.clock.now() + 1)
    r.clock.run_until_idle()
    _, nbytes, _ = r.loaded["d"]
    assert nbytes == 400 * BPT  # the 1,600 cached tokens (100 blocks) stay local
    src = r.engine.stats().prompt_tokens_by_source
    assert src["local_cache_hit"] == 1600 and src["external_kv_transfer"] == 399


def test_transfers_into_one_engine_share_its_link_fifo():
    bw = 20e9
    r = Run(kv_transfer_bandwidth=bw)
    r.submit("a", tokens(3000, seed=1), max_tokens=1, remote_prefill=True)
    r.submit("b", tokens(1000, seed=2), max_tokens=1, remote_prefill=True)
    r.clock.run_until_idle()
    assert r.loaded["a"][0] == pytest.approx(3000 * BPT / bw)
    assert r.loaded["b"][0] == pytest.approx(4000 * BPT / bw)  # waited for a's transfer


def test_a_request_arriving_while_a_load_is_pending_is_not_delayed():
    r = Run(kv_transfer_bandwidth=1e9)  # a slow link: the load takes ~1 s
    r.submit("d", tokens(8000), max_tokens=1, remote_prefill=True)
    r.submit("x", tokens(100, seed=9), max_tokens=1, at=0.1)
    r.clock.run_until_idle()
    cfg = r.engine.config
    assert r.first["x"] == pytest.approx(0.1 + cfg.step_overhead + 100 * cfg.prefill_time_per_token)
    assert r.first["d"] > r.loaded["d"][0] >= 1.0


def test_prefill_side_holds_blocks_until_released():
    r = Run()
    r.submit("p", tokens(2000), max_tokens=1, remote_decode=True)
    r.clock.run_until(lambda: "p" in r.done)
    e = r.engine
    assert e.stats().remote_decode_prefills_total == 1 and e.num_held_transfers == 1
    assert e.stats().requests_by_role["prefill"] == 1
    held = e.kv_cache_usage()
    assert held == pytest.approx(-(-2000 // 16) / e.config.num_gpu_blocks)
    assert e.reset_prefix_cache() is False  # referenced blocks
    assert r.loop.release_transfer("p") is True
    assert e.kv_cache_usage() == 0 and e.num_held_transfers == 0
    assert r.loop.release_transfer("p") is False
    assert e.stats().kv_expired_reqs_total == 0


def test_unread_held_blocks_expire_after_the_hold_time():
    r = Run(kv_hold_time=5.0)
    req = r.submit("p", tokens(500), max_tokens=1, remote_decode=True)
    r.clock.run_until_idle()
    assert req.kv_block_ids is not None and len(req.kv_block_ids) == -(-500 // 16)
    assert r.engine.num_held_transfers == 0 and r.engine.kv_cache_usage() == 0
    assert r.engine.stats().kv_expired_reqs_total == 1
    assert r.clock.now() == pytest.approx(r.done["p"] + 5.0)


def test_released_hold_leaves_no_timer_behind():
    r = Run(kv_hold_time=300.0)
    r.submit("p", tokens(500), max_tokens=1, remote_decode=True)
    r.clock.run_until(lambda: "p" in r.done)
    r.loop.release_transfer("p")
    r.clock.run_until_idle()
    assert r.clock.now() < 1.0  # no expiry event ran at t=300
    assert r.engine.stats().kv_expired_reqs_total == 0


def test_held_blocks_count_against_capacity_and_release_wakes_waiting_work():
    # 40 blocks: a held 500-token prefill (32 blocks) leaves too little for a 300-token request.
    r = Run(num_gpu_blocks=40, kv_hold_time=100.0)
    r.submit("p", tokens(500, seed=1), max_tokens=1, remote_decode=True)
    r.submit("q", tokens(300, seed=2), max_tokens=1, at=0.5)
    r.clock.run(until=2.0)
    assert "q" not in r.first and r.engine.stats().num_requests_waiting == 1
    r.clock.call_at(3.0, lambda: r.loop.release_transfer("p"))
    r.clock.run_until_idle()
    assert 3.0 < r.first["q"] < 3.1


def test_abort_while_loading_frees_the_blocks():
    r = Run(kv_transfer_bandwidth=1e9)
    r.submit("d", tokens(4000), max_tokens=4, remote_prefill=True)
    r.clock.run(until=0.1)
    assert r.engine.stats().num_requests_waiting == 1 and r.engine.kv_cache_usage() > 0
    assert r.loop.abort("d") is True
    r.clock.run_until_idle()
    assert r.engine.kv_cache_usage() == 0 and "d" not in r.first


def test_hardware_presets_order_step_times_as_documented():
    def durations(hw: str) -> tuple[float, float, int]:
        e = Engine(engine_config(hw))
        e.submit(EngineRequest("p", tokens(2000), 2), 0.0)
        prefill = e.step(0.0)
        e.finish_step(prefill)
        for i in range(63):  # a decode batch of 64 sequences
            e.submit(EngineRequest(f"d{i}", tokens(16, seed=i + 5), 2), prefill)
        t = prefill
        d = e.step(t)  # admits the 63 (prefill) and decodes "p"
        e.finish_step(t + d)
        decode = e.step(t + d)  # 64 decoding sequences
        return prefill, decode, e.config.num_gpu_blocks

    got = {hw: durations(hw) for hw in ("h100", "h200", "a100", "a100-40gb")}
    h100, h200, a100, a100_40 = got["h100"], got["h200"], got["a100"], got["a100-40gb"]
    # Prefill (compute-bound): the A100s are ~2.2x slower than H100/H200.
    assert a100[0] > 2 * h100[0] and a100[0] == pytest.approx(a100_40[0], rel=0.05)
    # Decode (bandwidth-bound): H200 < H100 < A100 80 GB < A100 40 GB.
    assert h200[1] < h100[1] < a100[1] < a100_40[1]
    # KV capacity follows memory: H200 > H100 = A100 80 GB > A100 40 GB.
    assert h200[2] > h100[2] == a100[2] > a100_40[2]
    assert EngineConfig().step_overhead == HARDWARE["h100"].step_overhead  # the defaults are an H100
    assert HARDWARE["a100"].kv_transfer_bandwidth < HARDWARE["h100"].kv_transfer_bandwidth


def test_explicit_timings_override_a_preset_and_unknown_hardware_is_refused():
    cfg = engine_config("a100", step_overhead=0.001, decode_time_per_seq=None)
    assert cfg.step_overhead == 0.001 and cfg.decode_time_per_seq == HARDWARE["a100"].decode_time_per_seq
    with pytest.raises(ValueError, match="unknown hardware"):
        engine_config("tpu-v9")
    with pytest.raises(ValueError, match="kv_transfer_bandwidth"):
        EngineConfig(kv_transfer_bandwidth=0)


def test_disaggregate_runs_the_sidecar_sequence_in_virtual_time():
    from simulator.pd import disaggregate

    clock = VirtualClock()
    p_loop = EngineLoop(Engine(engine_config("h100")), clock)
    d_loop = EngineLoop(Engine(engine_config("a100", kv_transfer_bandwidth=20e9)), clock)
    n = 6000
    first: dict[str, float] = {}
    req = EngineRequest("r", tokens(n), 10, on_first_token=lambda t, _c: first.setdefault("r", t))
    state = disaggregate(p_loop, d_loop, req)
    clock.run_until_idle()
    p, d = p_loop.engine, d_loop.engine
    # Prefill on the H100: 6,000 tokens in chunks of 8,192 = one step.
    prefill_end = p.config.step_overhead + n * p.config.prefill_time_per_token
    assert state.prefilled_at == pytest.approx(prefill_end)
    assert state.kv_loaded_at == pytest.approx(prefill_end + n * BPT / 20e9) and state.kv_bytes == n * BPT
    assert first["r"] == pytest.approx(state.kv_loaded_at + d.config.step_overhead + d.config.prefill_time_per_token)
    assert p.stats().prompt_tokens_by_source["local_compute"] == n and p.stats().requests_by_role["prefill"] == 1
    assert d.stats().prompt_tokens_by_source["local_compute"] == 1 and d.stats().requests_by_role["decode"] == 1
    assert d.stats().generation_tokens_total == 10 and p.stats().generation_tokens_total == 1
    # The prefill blocks were released by the load, not by the 480 s expiry.
    assert p.kv_cache_usage() == 0 and p.stats().kv_expired_reqs_total == 0 and clock.now() < 1.0
    assert not state.local_fallback
