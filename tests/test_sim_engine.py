"""The engine model on the virtual clock: prefix caching, eviction, queueing, LoRA slots."""

from __future__ import annotations

import random

import pytest

from simulator import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Engine,
    EngineConfig,
    EngineLoop,
    EngineRequest,
    PromptTooLong,
    VirtualClock,
    apply_chat_template,
    block_hashes,
    encode,
)
from simulator.tokenizer import OUTPUT_VOCAB, decode_token, pieces


class Run:
    """One engine on a virtual clock, recording every request's timings."""

    def __init__(self, **cfg) -> None:
        self.clock = VirtualClock()
        self.events: list = []
        self.engine = Engine(EngineConfig(**cfg), on_kv_events=self.events.extend)
        self.steps: list[tuple[float, int, int]] = []  # (start, running, waiting) at each step
        self.loop = EngineLoop(self.engine, self.clock, on_step=self._on_step)
        self.reqs: dict[str, EngineRequest] = {}
        self.tokens: dict[str, list[float]] = {}

    def _on_step(self, start: float, _duration: float, _tokens: int) -> None:
        s = self.engine.stats()
        self.steps.append((start, s.num_requests_running, s.num_requests_waiting))

    def submit(self, rid: str, tokens: list[int], max_tokens: int = 4, at: float | None = None, **kw) -> None:
        times = self.tokens.setdefault(rid, [])
        req = EngineRequest(rid, tokens, max_tokens, on_token=lambda t, _tok: times.append(t), **kw)
        self.reqs[rid] = req
        if at is None:
            self.loop.submit(req)
        else:
            self.clock.call_at(at, lambda: self.loop.submit(req))

    def ttft(self, rid: str) -> float:
        r = self.reqs[rid]
        return r.first_token_at - r.arrival

    def e2e(self, rid: str) -> float:
        r = self.reqs[rid]
        return r.finished_at - r.arrival


def toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(n)]


def test_shared_prefix_is_cached_and_skips_its_prefill():
    cfg = EngineConfig()
    run = Run()
    prefix = toks(2000, 1)
    run.submit("a", prefix + toks(37, 2))
    run.clock.run_until_idle()
    run.submit("b", prefix + toks(37, 3))
    run.clock.run_until_idle()
    a, b = run.reqs["a"], run.reqs["b"]
    assert a.cached_tokens == 0
    assert b.cached_tokens == 2000  # 125 shared full blocks of 16
    saved = run.ttft("a") - run.ttft("b")
    assert saved == pytest.approx(2000 * cfg.prefill_time_per_token, rel=1e-9)
    assert run.ttft("b") == pytest.approx(cfg.step_overhead + 37 * cfg.prefill_time_per_token)
    s = run.engine.stats()
    assert (s.prefix_cache_hits_total, s.prefix_cache_queries_total) == (2000, 2 * 2037)
    assert s.prefix_cache_hit_requests_total == 1
    assert s.request_success_total["length"] == 2


def test_identical_prompt_recomputes_only_its_last_block():
    run = Run()
    p = toks(160, 5)  # exactly 10 blocks: the last token must be recomputed to sample
    run.submit("a", p)
    run.clock.run_until_idle()
    run.submit("b", p)
    run.clock.run_until_idle()
    assert run.reqs["b"].cached_tokens == 144


def test_cache_full_evicts_least_recently_used_unreferenced_blocks():
    run = Run(num_gpu_blocks=20)
    a, b, c = toks(80, 10), toks(80, 11), toks(80, 12)  # 5 full blocks each
    for rid, p in (("a", a), ("b", b), ("c", c), ("a2", a)):  # a2 touches a's blocks again
        run.submit(rid, p, max_tokens=1)
        run.clock.run_until_idle()
    assert [run.engine.cached_prefix_blocks(p) for p in (a, b, c)] == [5, 5, 5]
    run.events.clear()
    run.submit("d", toks(160, 13), max_tokens=1)  # needs 10 blocks: 5 free + 5 evicted
    run.clock.run_until_idle()
    assert [run.engine.cached_prefix_blocks(p) for p in (a, b, c)] == [5, 0, 5]
    removed = [h for e in run.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed == list(reversed(block_hashes(b, 16)))  # a finished request's tail goes first


def test_blocks_of_running_requests_are_never_evicted():
    run = Run(num_gpu_blocks=12)
    long_p = toks(96, 20)  # 6 blocks, decoding for a while
    run.submit("long", long_p, max_tokens=60)
    run.clock.run(until=0.05)
    assert run.reqs["long"].state == 1  # running
    run.submit("other", toks(96, 21), max_tokens=1)  # needs 6 more: only 6 left, none evictable
    run.clock.run_until_idle()
    assert run.engine.cached_prefix_blocks(long_p) == 6
    removed = {h for e in run.events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert not removed & set(block_hashes(long_p, 16))


def test_more_requests_than_max_num_seqs_wait_and_latency_grows():
    run = Run(max_num_seqs=2)
    for i in range(6):
        run.submit(f"r{i}", toks(100, 30 + i), max_tokens=20)
    run.clock.run_until_idle()
    assert max(w for _, _, w in run.steps) == 4
    assert max(r for _, r, _ in run.steps) == 2
    # r4/r5 only start after two earlier requests finished
    assert run.reqs["r4"].scheduled_at >= run.reqs["r0"].finished_at
    assert run.e2e("r5") > 2.5 * run.e2e("r0")
    assert run.engine.stats().num_requests_waiting == 0


def test_kv_capacity_makes_requests_wait():
    run = Run(num_gpu_blocks=40)  # each request needs 10 blocks (150 + 8 tokens): 4 at once
    for i in range(8):
        run.submit(f"r{i}", toks(150, 50 + i), max_tokens=8)
    run.clock.run_until_idle()
    assert max(r for _, r, _ in run.steps) == 4
    assert max(w for _, _, w in run.steps) == 4
    assert run.engine.num_preemptions_total == 0
    assert run.reqs["r4"].scheduled_at >= run.reqs["r0"].finished_at  # waited for blocks to free
    assert run.e2e("r7") > 1.8 * run.e2e("r0")
    assert all(r.finished_at is not None for r in run.reqs.values())
    assert run.engine.kv_cache_usage() == 0.0


def test_decode_growth_past_capacity_preempts_and_still_completes():
    run = Run(num_gpu_blocks=10)
    run.submit("a", toks(64, 60), max_tokens=40)  # 4 prompt blocks, 7 at the end
    run.submit("b", toks(64, 61), max_tokens=40)
    run.clock.run_until_idle()
    assert run.engine.num_preemptions_total >= 1
    assert all(len(run.tokens[r]) == 40 for r in ("a", "b"))
    assert run.engine.kv_cache_usage() == 0.0


def test_restart_recomputes_running_requests_empties_the_cache_and_publishes_all_blocks_cleared():
    run = Run(num_gpu_blocks=64)
    run.submit("a", toks(64, 62), max_tokens=100)
    run.clock.run_until(lambda: len(run.tokens["a"]) >= 2, limit=5.0)
    assert run.engine.num_cached_blocks == 4
    run.engine.restart()
    assert run.engine.num_cached_blocks == 0 and not run.engine.running
    assert run.reqs["a"].num_preemptions == 1 and run.engine.waiting[0] is run.reqs["a"]
    assert isinstance(run.events[-1], AllBlocksCleared)
    run.clock.run_until_idle()
    assert len(run.tokens["a"]) == 100 and run.engine.num_cached_blocks == 4  # recomputed, stored again


def test_request_for_non_resident_adapter_waits_for_a_lora_slot():
    run = Run(max_loras=1, lora_load_time=0.05)
    run.submit("a", toks(50, 70), max_tokens=30, lora="sql")
    run.submit("b", toks(50, 71), max_tokens=5, lora="chat")
    run.submit("c", toks(50, 72), max_tokens=5)  # base model: not blocked by the LoRA queue
    run.clock.run(until=0.02)
    s = run.engine.stats()
    assert s.running_lora_adapters == ["sql"] and s.waiting_lora_adapters == ["chat"]
    assert run.reqs["c"].state == 1
    run.clock.run_until_idle()
    a, b = run.reqs["a"], run.reqs["b"]
    assert b.scheduled_at >= a.finished_at
    assert run.engine.lora_loads_total == 2
    cfg = run.engine.config
    # the step that loads an adapter pays for it
    assert run.ttft("a") >= cfg.lora_load_time + cfg.step_overhead


def test_lora_blocks_do_not_match_base_model_blocks():
    p = toks(64, 80)
    assert block_hashes(p, 16) != block_hashes(p, 16, "sql")
    assert block_hashes(p, 16)[1] != block_hashes(p[16:32] + p[16:32], 16)[1]  # chained on the parent


def test_bigger_batch_makes_each_step_slower():
    cfg = EngineConfig()
    itl = {}
    for n in (1, 16):
        run = Run()
        for i in range(n):
            run.submit(f"r{i}", toks(20, 90 + i), max_tokens=10)
        run.clock.run_until_idle()
        t = run.tokens["r0"]
        itl[n] = t[-1] - t[-2]
    assert itl[1] == pytest.approx(cfg.step_overhead + cfg.decode_time_per_seq)
    assert itl[16] == pytest.approx(cfg.step_overhead + 16 * cfg.decode_time_per_seq)


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    cfg = EngineConfig(max_num_batched_tokens=512)
    run = Run(max_num_batched_tokens=512)
    run.submit("a", toks(2000, 100))
    run.clock.run_until_idle()
    assert run.ttft("a") == pytest.approx(4 * cfg.step_overhead + 2000 * cfg.prefill_time_per_token)


def test_too_long_prompt_is_rejected_and_abort_frees_blocks():
    run = Run(max_model_len=100)
    with pytest.raises(PromptTooLong, match="maximum context length is 100"):
        run.submit("x", toks(99, 1), max_tokens=2)
    run.submit("a", toks(80, 2), max_tokens=10)
    run.clock.run(until=0.02)
    assert run.engine.kv_cache_usage() > 0
    assert run.loop.abort("a")
    assert run.engine.kv_cache_usage() == 0.0
    assert run.engine.stats().request_success_total["abort"] == 1
    run.clock.run_until_idle()
    assert run.reqs["a"].finished_at is None


def test_kv_events_match_the_blocks_the_engine_holds():
    run = Run(num_gpu_blocks=16)
    p1 = toks(130, 7)
    run.submit("a", p1, max_tokens=1)
    run.clock.run_until_idle()
    stored = [e for e in run.events if isinstance(e, BlockStored)]
    assert [h for e in stored for h in e.block_hashes] == block_hashes(p1, 16)
    assert stored[0].parent_block_hash is None
    assert [t for e in stored for t in e.token_ids] == p1[:128]
    live = set()
    for e in run.events:
        if isinstance(e, BlockStored):
            live |= set(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            live -= set(e.block_hashes)
    assert all(run.engine.is_cached(h) for h in live) and len(live) == run.engine.num_cached_blocks


def test_cached_prefix_blocks_does_not_touch_lru_order():
    run = Run(num_gpu_blocks=10)
    a, b = toks(80, 1), toks(80, 2)
    for rid, p in (("a", a), ("b", b)):
        run.submit(rid, p, max_tokens=1)
        run.clock.run_until_idle()
    assert run.engine.cached_prefix_blocks(a) == 5  # a query, not a use
    run.submit("c", toks(80, 3), max_tokens=1)
    run.clock.run_until_idle()
    assert run.engine.cached_prefix_blocks(a) == 0 and run.engine.cached_prefix_blocks(b) == 5


def test_tokenizer_is_stable_and_about_four_chars_per_token():
    text = ("The quick brown fox jumps over the lazy dog. In the beginning of the project, the team "
            "decided that every request should be routed to the server that already holds the longest "
            "prefix of its prompt in its cache, because recomputing it costs time and money.")
    ids = encode(text)
    assert ids == encode(text)
    assert "".join(pieces(text)) == text
    assert 3.5 <= len(text) / len(ids) <= 4.5
    assert ids[:5] == [60166, 68959, 988, 76246, 108244]  # stable across processes and versions
    sys_prompt = [{"role": "system", "content": text}]
    x = encode(apply_chat_template(sys_prompt + [{"role": "user", "content": "Hi"}]))
    y = encode(apply_chat_template(sys_prompt + [{"role": "user", "content": "Bye"}]))
    common = next(i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v)
    assert common >= len(ids)
    assert all(decode_token(i) == t for i, t in OUTPUT_VOCAB)
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        apply_chat_template([{"content": "x"}])
