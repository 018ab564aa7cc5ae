"""Precise vs approximate prefix-cache routing in the cluster simulation (issue 12).

The pieces the cluster simulation (bench.cluster) needs to route on the servers' own KV
events, all in virtual time:

- EventFeed: every engine's KV events (BlockStored / BlockRemoved / AllBlocksCleared as
  simulator.engine emits them) go through vLLM's wire format (simulator.kv_events encodes,
  epp.datalayer.kvevents.wire decodes, as over ZMQ) and reach each subscribed block index
  `delay` virtual seconds after the engine step that produced them.
- PreciseRouter: the real picker pipeline with the reference guide's profile (prefix-cache
  scorer 2, kv-cache-utilization 1, queue 1) fed by precise-prefix-cache-producer, whose
  block index gets the events through the producer's in-process `feed`, with speculative
  entries for just-routed requests (speculativeIndexing, speculativeTTL 2s, as the llm-d
  guide sets it). The prompt's token ids are the ones the simulator computed, handed to
  the producer as token-producer's TOKEN_IDS (a tokenizer matching the server's).
  "approximate" is the same profile with approx-prefix-cache-producer.
- Replicas: several picker replicas behind a load balancer (round-robin or random split),
  each with its own endpoint view (in-flight counts), approximate index and block index;
  every block index is fed by the same events.
- restarts: a server restart as far as the cache is concerned (simulator.engine's
  Engine.restart: its in-flight requests are recomputed from scratch as a preemption, its
  prefix cache is emptied and it publishes AllBlocksCleared).

`python -m bench.precise` runs the comparison (random, approximate, precise with and without
speculativeIndexing, the reference's default being without) over offered
rates from light load to saturation plus two stress variants (servers restarting mid-run;
two picker replicas), prints a table and writes bench/results/precise.{md,png}.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import cluster
from bench.cluster import ClusterConfig, ClusterResult, PickerRouter, RandomRouter, Router
from bench.loadgen import Progress
from bench.workloads import LoadSpec, SharedPrefix, WorkItem, WorkloadSpec, arrival_times, generate
from epp.datalayer.kvevents import KVEvent, decode_batch
from epp.framework import Endpoint
from epp.framework.datakeys import TOKEN_IDS
from epp.requestcontrol.producers.precise_prefix import PrecisePrefixCacheProducer
from simulator.clock import VirtualClock
from simulator.engine import Engine, EngineConfig
from simulator.kv_events import encode_batch

STRATEGIES = ("random", "approximate", "precise", "precise-nospec")  # nospec: speculativeIndexing off
SPLITS = ("round-robin", "random")


def _config(producer: str) -> str:
    """The reference guide's precise-prefix-cache scheduling profile with `producer` feeding
    prefix-cache-scorer (the same scorers and weights for both producers)."""
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: {producer}
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: {producer}
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2.0
  - pluginRef: kv-cache-utilization-scorer
    weight: 1.0
  - pluginRef: queue-scorer
    weight: 1.0
  - pluginRef: max-score-picker
"""


APPROX_CONFIG = _config("approx-prefix-cache-producer")


def precise_config(block_size: int, speculative_ttl: float | None) -> str:
    """The same profile with precise-prefix-cache-producer at the servers' block size
    (speculativeIndexing on with that TTL in seconds, off for None)."""
    params = f"""\
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: {block_size}
    speculativeIndexing: {'true' if speculative_ttl else 'false'}
    speculativeTTL: {speculative_ttl or 2.0:g}s
"""
    return _config("precise-prefix-cache-producer").replace(
        "- type: precise-prefix-cache-producer\n", "- type: precise-prefix-cache-producer\n" + params, 1)


# --------------------------------------------------------------------------- event delivery
class EventFeed:
    """Delivers each engine's KV events to the subscribed block indexes `delay` virtual
    seconds after they were produced, in order, through vLLM's wire encoding."""

    def __init__(self, clock: VirtualClock, engines: Sequence[Engine], names: Sequence[str], model: str,
                 delay: float) -> None:
        if not delay >= 0:
            raise ValueError(f"event delay must be >= 0, got {delay!r}")
        self.clock = clock
        self.model = model
        self.delay = delay
        self.sinks: list[Callable[[str, Sequence[KVEvent], str], None]] = []
        self.batches = 0  # batches delivered
        self.events = 0  # events delivered (to each sink)
        for engine, name in zip(engines, names, strict=True):
            engine.on_kv_events = lambda events, name=name: self._publish(name, events)

    def subscribe(self, sink: Callable[[str, Sequence[KVEvent], str], None]) -> None:
        """sink(endpoint name, events, model): a producer's `feed` or a BlockIndex's `apply`."""
        self.sinks.append(sink)

    def _publish(self, name: str, events: list) -> None:
        now = self.clock.now()
        batch = decode_batch(encode_batch(events, now))
        self.clock.call_at(now + self.delay, lambda: self._deliver(name, batch.events))

    def _deliver(self, name: str, events: tuple) -> None:
        for sink in self.sinks:
            sink(name, events, self.model)
        self.batches += 1
        self.events += len(events)


# --------------------------------------------------------------------------- precise routing
class PreciseRouter(PickerRouter):
    """The picker pipeline with precise-prefix-cache-producer (fed by an EventFeed through
    its in-process `feed`). The simulator's token ids of the prompt are handed to it as
    token-producer's TOKEN_IDS (what a tokenizer matching the server's publishes)."""

    def __init__(self, endpoints: list[Endpoint], clock: VirtualClock, rng: random.Random, block_size: int,
                 speculative_ttl: float | None = 2.0) -> None:
        super().__init__(endpoints, precise_config(block_size, speculative_ttl), clock, rng)
        self.producer = next(p for p in self.pipeline.plugins.values() if isinstance(p, PrecisePrefixCacheProducer))
        self.blocks = self.producer.index
        self._tokens: tuple[int, ...] = ()
        match = self.producer.match

        def with_token_ids(cycle, request, candidates):
            cycle.write(TOKEN_IDS, self._tokens)
            return match(cycle, request, candidates)

        self.producer.match = with_token_ids  # type: ignore[method-assign]

    def route(self, item, prompt, request) -> int:
        self._tokens = tuple(prompt.token_ids)
        return super().route(item, prompt, request)


class Replicas(Router):
    """Several picker replicas behind a load balancer that splits requests among them
    (round-robin or random). Each replica has its own copies of the endpoints (its own
    in-flight counts), refreshed from the scraped metrics before it routes."""

    needs_request = True

    def __init__(self, endpoints: list[Endpoint], make: Callable[[list[Endpoint]], Router], replicas: int,
                 split: str, rng: random.Random) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if split not in SPLITS:
            raise ValueError(f"split: unknown {split!r} (known: {', '.join(SPLITS)})")
        self.source = endpoints
        self.views = [[Endpoint(name=e.name, address=e.address, port=e.port, labels=dict(e.labels))
                       for e in endpoints] for _ in range(replicas)]
        self.routers = [make(view) for view in self.views]
        self.split = split
        self.rng = rng
        self.next = 0
        self.routed = [0] * replicas  # requests each replica routed
        self.owner: dict[int, int] = {}  # id(request) -> replica; at most the requests in flight

    def route(self, item, prompt, request) -> int:
        if self.split == "random":
            k = self.rng.randrange(len(self.routers))
        else:
            k = self.next
            self.next = (k + 1) % len(self.routers)
        for view, src in zip(self.views[k], self.source, strict=True):
            view.metrics = src.metrics
        router = self.routers[k]
        server = router.route(item, prompt, request)
        self.prefill = router.prefill
        self.owner[id(request)] = k
        self.routed[k] += 1
        return server

    def received(self, server, request, info) -> None:
        self.routers[self.owner[id(request)]].received(server, request, info)

    def complete(self, server, item, prompt, request, info) -> None:
        self.routers[self.owner.pop(id(request))].complete(server, item, prompt, request, info)


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True, slots=True)
class Scenario:
    """How the cluster runs: KV-event delay (virtual s), picker replicas and their split,
    and servers restarting every `restart_every` virtual seconds (one at a time, in turn)."""

    name: str = "baseline"
    event_delay: float = 0.005
    replicas: int = 1
    split: str = "round-robin"
    restart_every: float = 0.0  # 0: no restarts
    max_restarts: int = 1000  # bound on scheduled restarts
    speculative_ttl: float | None = 2.0  # None: speculativeIndexing off


@dataclass(slots=True)
class Probe:
    """What a run exposes to tests: the feed, the router, the restarts done."""

    feed: EventFeed | None = None
    router: Router | None = None
    restarts: list[tuple[float, int]] = field(default_factory=list)


def factory(strategy: str, scenario: Scenario, cfg: ClusterConfig, horizon: float = 0.0,
            probe: Probe | None = None) -> Callable[[VirtualClock, list[Engine], list[Endpoint], random.Random], Router]:
    """A bench.cluster.EXTRA_ROUTERS factory for `strategy` under `scenario`; restarts stop
    at `horizon` virtual seconds (the last arrival)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    probe = probe if probe is not None else Probe()

    def make(clock: VirtualClock, engines: list[Engine], endpoints: list[Endpoint], rng: random.Random) -> Router:
        if scenario.restart_every > 0:
            _schedule_restarts(clock, engines, scenario, horizon, probe)
        if strategy == "random":
            router: Router = RandomRouter(len(engines), rng)
            probe.router = router
            return router
        feed = None
        if strategy.startswith("precise"):
            feed = probe.feed = EventFeed(clock, engines, [e.name for e in endpoints], cfg.model, scenario.event_delay)

        def one(view: list[Endpoint]) -> Router:
            if feed is None:
                return PickerRouter(view, APPROX_CONFIG, clock, rng)
            ttl = None if strategy == "precise-nospec" else scenario.speculative_ttl
            r = PreciseRouter(view, clock, rng, cfg.engine.block_size, ttl)
            feed.subscribe(r.producer.feed)
            return r

        router = one(endpoints) if scenario.replicas == 1 else Replicas(
            endpoints, one, scenario.replicas, scenario.split, rng)
        probe.router = router
        return router

    return make


def _schedule_restarts(clock: VirtualClock, engines: list[Engine], scenario: Scenario, horizon: float,
                       probe: Probe) -> None:
    """Restart servers in turn every scenario.restart_every seconds until `horizon`."""
    def fire(k: int) -> None:
        i = k % len(engines)
        engines[i].restart()
        probe.restarts.append((clock.now(), i))

    every = scenario.restart_every
    for k in range(min(scenario.max_restarts, int(horizon / every))):
        clock.call_at((k + 1) * every, lambda k=k: fire(k))


def simulate(strategy: str, items: Sequence[WorkItem], load: LoadSpec, cfg: ClusterConfig, scenario: Scenario,
             *, progress: Progress | None = None, probe: Probe | None = None) -> ClusterResult:
    """One bench.cluster.simulate run of `strategy` under `scenario`."""
    name = f"{strategy}@{scenario.name}"
    horizon = arrival_times(len(items), load.rate, cfg.seed)[-1] if load.type == "poisson" and items else 0.0
    cluster.EXTRA_ROUTERS[name] = factory(strategy, scenario, cfg, horizon, probe)
    try:
        result = cluster.simulate(name, items, load, cfg, progress=progress)
    finally:
        del cluster.EXTRA_ROUTERS[name]
    result.strategy = strategy
    return result


# --------------------------------------------------------------------------- the benchmark
@dataclass(frozen=True, slots=True)
class Sizing:
    servers: int = 4
    gpu_blocks: int = 2048  # per server, of block_size tokens
    block_size: int = 16
    fill: float = 0.75  # of the pool's KV memory taken by the distinct prefixes
    prefix_len: int = 3000  # target tokens of each shared system prompt
    questions: int = 16
    question_len: int = 50
    output_len: int = 32


def workload(s: Sizing, requests: int, seed: int) -> tuple[list[WorkItem], int]:
    """The shared-prefix workload whose prefixes fill `s.fill` of the pool's KV memory:
    (items, number of prefixes); prefix_blocks(items) counts the blocks they take."""
    pool_blocks = s.servers * s.gpu_blocks
    per_prefix = math.ceil(s.prefix_len / s.block_size)
    groups = max(1, round(s.fill * pool_blocks / per_prefix))
    spec = WorkloadSpec("shared_prefix", SharedPrefix(groups, s.questions, s.prefix_len, s.question_len,
                                                      s.output_len), num_requests=requests, seed=seed)
    return generate(spec), groups


def prefix_blocks(items: Sequence[WorkItem], block_size: int) -> int:
    """Full KV blocks the distinct system prompts take, tokenised as the servers do."""
    from simulator.tokenizer import apply_chat_template, encode

    seen = {it.messages[0]["content"] for it in items}
    return sum(len(encode(apply_chat_template([{"role": "system", "content": s}], add_generation_prompt=False)))
               // block_size for s in seen)


def common_args(ap: argparse.ArgumentParser, *, rates: str, requests: int, prefix_len: int, strategies: str,
                out: str) -> None:
    """The flags bench.precise and bench.precise_stack share."""
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=prefix_len, help="tokens per shared system prompt")
    ap.add_argument("--rates", default=rates, help="offered rates, requests/s (comma-separated)")
    ap.add_argument("--requests", type=int, default=requests, help="requests per run")
    ap.add_argument("--fill", type=float, default=0.75, help="fraction of the pool's KV memory the prefixes take")
    ap.add_argument("--strategies", default=strategies, help=f"comma-separated, of {', '.join(STRATEGIES)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=out, help="output path prefix")


def rates_and_strategies(rates: str, strategies: str) -> tuple[list[float], list[str]]:
    """--rates and --strategies, checked (ValueError with the reason)."""
    try:
        rs = [float(x) for x in rates.split(",") if x]
    except ValueError:
        raise ValueError(f"--rates: comma-separated numbers expected, got {rates!r}") from None
    if not rs or any(not r > 0 for r in rs):
        raise ValueError("--rates: positive numbers expected")
    names = [x for x in strategies.split(",") if x]
    for x in names:
        if x not in STRATEGIES:
            raise ValueError(f"unknown strategy {x!r} (known: {', '.join(STRATEGIES)})")
    return rs, names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.precise", description=__doc__.split("\n\n")[0])
    common_args(ap, rates="5,15,30,60,100,150", requests=2000, prefix_len=3000, strategies=",".join(STRATEGIES),
                out="bench/results/precise")
    ap.add_argument("--gpu-blocks", type=int, default=2048, help="KV blocks per server (16 tokens each)")
    ap.add_argument("--event-delay", type=float, default=0.005, help="KV-event delivery delay, seconds")
    ap.add_argument("--speculative-ttl", type=float, default=2.0,
                    help="precise: speculativeIndexing TTL, seconds (0: speculativeIndexing off)")
    ap.add_argument("--stress-rate", type=float, default=60.0, help="offered rate of the stress variants")
    ap.add_argument("--restart-every", type=float, default=5.0, help="seconds between server restarts (stress)")
    ap.add_argument("--replicas", type=int, default=2, help="picker replicas (stress)")
    ap.add_argument("--split", choices=SPLITS, default="round-robin")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    try:
        rates, strategies = rates_and_strategies(a.rates, a.strategies)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizing = Sizing(servers=a.servers, gpu_blocks=a.gpu_blocks, prefix_len=a.prefix_len, fill=a.fill)
    items, groups = workload(sizing, a.requests, a.seed)
    pool = sizing.servers * sizing.gpu_blocks
    used = prefix_blocks(items, sizing.block_size)
    print(f"pool: {sizing.servers} servers x {sizing.gpu_blocks} blocks x {sizing.block_size} tokens = "
          f"{pool * sizing.block_size} tokens; {groups} shared prefixes take {used} blocks = {used / pool:.0%} "
          f"of the pool's KV memory", flush=True)
    cfg = ClusterConfig(servers=sizing.servers, seed=a.seed,
                        engine=EngineConfig(num_gpu_blocks=sizing.gpu_blocks, block_size=sizing.block_size))
    common = {"event_delay": a.event_delay, "speculative_ttl": a.speculative_ttl or None}
    base = Scenario("baseline", **common)
    runs: list[tuple[Scenario, float]] = [(base, r) for r in rates]
    runs += [(Scenario(f"restart every {a.restart_every:g}s", restart_every=a.restart_every, **common), a.stress_rate),
             (Scenario(f"{a.replicas} replicas ({a.split})", replicas=a.replicas, split=a.split, **common), a.stress_rate)]
    from bench.report import Row

    rows: list[tuple[str, Row, ClusterResult]] = []
    t0 = time.perf_counter()
    for scenario, rate in runs:
        for s in strategies:
            label = f"{scenario.name} {s} @{rate:g}/s"
            r = simulate(s, items, LoadSpec(rate=rate), cfg, scenario, progress=Progress(f"{label:<40}", len(items)))
            rows.append((scenario.name, Row(s, rate, r.summary(), r.hit_rate, r.per_server, r.results), r))
    wall = time.perf_counter() - t0
    text = report(rows)
    print(text)
    print(f"wall {wall:.1f} s")
    out = Path(a.out)
    from bench.report import command_line, write_markdown

    cmd = command_line(["bench", "precise", *(argv if argv is not None else sys.argv[1:])])
    write_markdown(out.with_suffix(".md"), "Precise vs approximate prefix-cache routing (cluster simulation)", cmd,
                   f"Pool: {sizing.servers} servers x {sizing.gpu_blocks} KV blocks of {sizing.block_size} tokens; "
                   f"{groups} shared prefixes of ~{sizing.prefix_len} tokens take {used / pool:.0%} of the pool's "
                   f"KV memory; {a.requests} requests per run; KV events delivered after {a.event_delay * 1000:g} ms."
                   f"\n\n```\n{text}\n```", f"Wall time {wall:.0f} s.")
    if not a.no_plot:
        plot(rows, out.with_suffix(".png"), "random vs approximate vs precise prefix-cache routing")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


HEADERS = ["scenario", "strategy", "rate/s", "TTFT p50 ms", "TTFT p90 ms", "output tok/s", "hit rate", "errors",
           "requests per server"]


def report(rows: Sequence[tuple[str, object, ClusterResult]]) -> str:
    from bench.report import ms, num, pct, table

    body = [[scen, r.strategy, num(r.rate, 1), ms(r.summary.ttft_p50), ms(r.summary.ttft_p90),
             num(r.summary.output_tokens_per_s, 0), pct(r.hit_rate), str(r.summary.errors),
             " ".join(str(int(c)) for c in r.per_server)] for scen, r, _ in rows]
    return table(HEADERS, body)


def plot(rows: Sequence[tuple[str, object, ClusterResult]], path: Path, title: str) -> None:
    """Baseline TTFT p90, output tokens/s and hit rate against the rate, one line per
    strategy; a fourth panel groups TTFT p90 of the stress variants by strategy."""
    from bench.report import _by_strategy_over_rate, _finish_rate_axes, _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    base = [r for scen, r, _ in rows if scen == "baseline"]
    for name, rs, rates in _by_strategy_over_rate(base):
        # dashed over solid: where approximate and precise coincide both stay visible
        style = {"marker": "o", "label": name, "linestyle": "--" if name == "approximate" else "-",
                 "linewidth": 3 if name == "precise" else 1.5, "zorder": 3 if name == "approximate" else 2}
        axes[0].plot(rates, [r.summary.ttft_p90 * 1000 for r in rs], **style)
        axes[1].plot(rates, [r.summary.output_tokens_per_s for r in rs], **style)
        axes[2].plot(rates, [r.hit_rate * 100 for r in rs], **style)
    axes[0].set_ylabel("TTFT p90 (ms, log scale)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("output tokens/s")
    axes[2].set_ylabel("prefix-cache hit rate (%)")
    stress = [(scen, r) for scen, r, _ in rows if scen != "baseline"]
    scens = list(dict.fromkeys(s for s, _ in stress))
    strategies = list(dict.fromkeys(r.strategy for _, r in stress))
    width = 0.8 / max(1, len(strategies))
    ax = axes[3]
    for k, s in enumerate(strategies):
        ys = [next((r.summary.ttft_p90 * 1000 for sc, r in stress if sc == scen and r.strategy == s), 0.0)
              for scen in scens]
        ax.bar([i + k * width for i in range(len(scens))], ys, width, label=s)
    ax.set_xticks([i + width * (len(strategies) - 1) / 2 for i in range(len(scens))], scens, fontsize="small")
    rate = next((r.rate for _, r in stress), None)
    ax.set_ylabel(f"TTFT p90 (ms), stress variants at {rate:g}/s" if rate else "TTFT p90 (ms), stress variants")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    _finish_rate_axes(plt, fig, axes[:3], path, title)


if __name__ == "__main__":
    sys.exit(main())
