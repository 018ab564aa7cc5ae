"""bench.precise: KV events reach the picker's block index in virtual time after the
configured delay, picker replicas split the traffic, restarts clear a server's cache (and
the index sees it), and the benchmark command runs at a tiny scale."""

from __future__ import annotations

import random

import pytest

from bench import precise as P
from bench.cluster import ClusterConfig, _Prompts
from bench.workloads import LoadSpec
from epp.datalayer.kvevents import BlockIndex, BlockKeyer
from epp.framework import Endpoint, ResponseInfo
from epp.requestcontrol.parsers.openai import parse_body
from epp.requestcontrol.producers.prefix import ApproxPrefixCacheProducer
from simulator.clock import VirtualClock
from simulator.engine import Engine, EngineConfig, EngineLoop, EngineRequest

MODEL = "m"
SMALL = EngineConfig(num_gpu_blocks=256, block_size=16)


def _request(i: int, tokens: list[int], out: int = 4, done: list | None = None) -> EngineRequest:
    return EngineRequest(f"r{i}", tokens, out, on_finish=(lambda t, r: done.append(t)) if done is not None else None)


def _setup(delay: float) -> tuple[VirtualClock, Engine, EngineLoop, BlockIndex, P.EventFeed]:
    clock = VirtualClock()
    engine = Engine(SMALL)
    index = BlockIndex(BlockKeyer(16), clock=clock.now)
    feed = P.EventFeed(clock, [engine], ["s0"], MODEL, delay)
    feed.subscribe(index.apply)
    return clock, engine, EngineLoop(engine, clock), index, feed


def test_events_arrive_after_the_delay_not_before():
    clock, engine, loop, index, feed = _setup(delay=0.5)
    published: list[float] = []
    deliver = engine.on_kv_events
    engine.on_kv_events = lambda events: (published.append(clock.now()), deliver(events))
    tokens = list(range(1000, 1000 + 160))  # 10 full blocks
    loop.submit(_request(0, tokens))
    assert clock.run_until(lambda: bool(published), limit=5.0)
    t = published[0]
    clock.run(until=t + 0.5 - 1e-9)
    assert index.blocks_of("s0") == 0 and feed.batches == 0  # stored on the server, not yet known
    clock.run(until=t + 0.5)
    assert index.blocks_of("s0") == 10
    assert index.match(tokens, MODEL)["s0"].blocks == 10


def test_zero_delay_delivers_at_the_same_virtual_time():
    clock, engine, loop, index, _ = _setup(delay=0.0)
    loop.submit(_request(0, list(range(64))))
    clock.run_until(lambda: index.blocks_of("s0") > 0, limit=5.0)
    assert index.blocks_of("s0") == 4
    with pytest.raises(ValueError, match="delay"):
        P.EventFeed(clock, [engine], ["s0"], MODEL, -1.0)


def test_restart_clears_the_cache_recomputes_running_requests_and_the_index_follows():
    clock, engine, loop, index, _ = _setup(delay=0.01)
    done: list[float] = []
    warm = list(range(5000, 5000 + 320))
    loop.submit(_request(0, warm, out=1, done=done))
    clock.run_until(lambda: bool(done) and index.blocks_of("s0") == 20, limit=5.0)
    assert engine.num_cached_blocks == 20
    running = list(range(9000, 9000 + 64))
    loop.submit(_request(1, running, out=200, done=done))
    clock.run_until(lambda: engine.running and engine.running[0].num_output > 2, limit=5.0)
    engine.restart()
    assert engine.num_cached_blocks == 0 and not engine.running and engine.num_preemptions_total == 1
    clock.run(until=clock.now() + 0.01)  # AllBlocksCleared delivered (and nothing re-stored yet)
    assert "s0" not in index.match(warm, MODEL)
    clock.run_until_idle()
    assert len(done) == 2  # the preempted request was recomputed and finished


def _items(n: int = 48, groups: int = 4):
    sizing = P.Sizing(servers=2, gpu_blocks=512, prefix_len=400, questions=4, output_len=4)
    items, _ = P.workload(sizing, n, 3)
    return items[:n]


CFG = ClusterConfig(servers=2, seed=3, engine=EngineConfig(num_gpu_blocks=512, block_size=16))


@pytest.mark.parametrize("split", ["round-robin", "random"])
def test_replicas_split_the_traffic_and_each_index_gets_every_event(split):
    items = _items()
    probe = P.Probe()
    r = P.simulate("precise", items, LoadSpec(rate=20.0), CFG, P.Scenario("two", replicas=2, split=split),
                   probe=probe)
    router = probe.router
    assert isinstance(router, P.Replicas)
    assert sum(router.routed) == len(items) and all(r.ok for r in r.results)
    if split == "round-robin":
        assert router.routed == [24, 24]
    else:
        assert min(router.routed) > 0 and router.routed != [24, 24]
    a, b = (x.blocks for x in router.routers)
    assert len(probe.feed.sinks) == 2 and a.stats.stored_blocks == b.stats.stored_blocks > 0
    # each replica counts its own requests in flight on its own endpoint copies
    assert router.views[0][0] is not router.views[1][0] and not router.owner
    assert all(e.in_flight == 0 for view in router.views for e in view)


def test_approximate_replicas_only_learn_their_own_traffic():
    items = _items()
    probe = P.Probe()
    P.simulate("approximate", items, LoadSpec(rate=20.0), CFG, P.Scenario("two", replicas=2), probe=probe)
    sizes = [len(next(p for p in rt.pipeline.plugins.values() if isinstance(p, ApproxPrefixCacheProducer)).index)
             for rt in probe.router.routers]
    assert all(s > 0 for s in sizes)
    with pytest.raises(ValueError, match="split"):
        P.Replicas([Endpoint(name="a", address="10.0.0.1", port=1)], lambda v: None, 2, "hash", random.Random(1))


def test_restarts_run_in_turn_until_the_last_arrival_and_precise_sees_them():
    items = _items()
    probe = P.Probe()
    r = P.simulate("precise", items, LoadSpec(rate=20.0), CFG, P.Scenario("r", restart_every=0.5), probe=probe)
    assert [s for _, s in probe.restarts] == [k % 2 for k in range(len(probe.restarts))]
    assert [t for t, _ in probe.restarts] == pytest.approx([0.5 * (k + 1) for k in range(len(probe.restarts))])
    assert len(probe.restarts) >= 3 and all(x.ok for x in r.results)
    assert probe.router.blocks.stats.cleared == len(probe.restarts)


def test_precise_router_matches_from_events_only():
    """The precise router routes where the servers' events say a prefix is: to the server
    that stored it; after that server's cache is reset, the match there is gone."""
    clock = VirtualClock()
    engines = [Engine(SMALL), Engine(SMALL)]
    endpoints = [Endpoint(name=f"sim-{i}", address="10.0.0.1", port=8000 + i) for i in range(2)]
    feed = P.EventFeed(clock, engines, [e.name for e in endpoints], CFG.model, 0.0)
    router = P.PreciseRouter(endpoints, clock, random.Random(1), 16, speculative_ttl=None)
    feed.subscribe(router.producer.feed)
    item = _items(1)[0]
    prompt = _Prompts(16, CFG.model).get(item)
    EngineLoop(engines[1], clock).submit(EngineRequest("x", prompt.token_ids, 1))
    clock.run_until_idle()
    request = parse_body(prompt.body, "r", "/v1/chat/completions")
    for _ in range(3):  # not a lucky tie-break: the prefix decides
        assert router.route(item, prompt, request) == 1
        router.complete(1, item, prompt, request, ResponseInfo(status=200, end_of_stream=True))
    cycle, _ = router.pipeline.run_cycle(request, endpoints, commit=False)
    info = cycle.read(router.producer.key)
    assert info.matches == {endpoints[1]: len(prompt.token_ids) // 16} and info.longest == info.total_blocks
    assert engines[1].reset_prefix_cache()
    clock.run_until_idle()
    cycle, _ = router.pipeline.run_cycle(request, endpoints, commit=False)
    assert cycle.read(router.producer.key).matches == {}


def test_benchmark_command_tiny(tmp_path, capsys):
    rc = P.main(["--rates", "5,10", "--requests", "40", "--servers", "2", "--gpu-blocks", "512", "--prefix-len", "400",
                "--restart-every", "1", "--no-plot", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "of the pool's KV memory" in out
    for s in ("random", "approximate", "precise", "restart every 1s", "2 replicas (round-robin)"):
        assert s in out
    assert (tmp_path / "p.md").read_text().count("precise") >= 4
    assert P.main(["--rates", "0"]) == 2 and P.main(["--strategies", "oracle"]) == 2


def test_real_stack_config_wires_tokenizer_events_and_endpoints():
    from bench.precise_stack import TOKENIZER, stack_config
    from epp.assembly import load_plugin_set
    from epp.requestcontrol.producers.precise_prefix import PrecisePrefixCacheProducer

    ps = load_plugin_set(stack_config("tcp://127.0.0.1:5999"))
    producer = ps.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixCacheProducer) and producer.block_size == 16
    assert producer.params.kvEventsConfig.zmqEndpoint == "tcp://127.0.0.1:5999" and producer.params.speculativeIndexing
    assert [(src.name, [x.name for x in ex]) for src, ex in ps.data_sources if ex == [producer]] == [
        ("endpoint-notification-source", ["precise-prefix-cache-producer"])]
    assert ps.plugins["token-producer"].local is not None and (TOKENIZER / "tokenizer.json").exists()
