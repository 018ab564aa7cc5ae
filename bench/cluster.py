"""A virtual-time cluster simulation: N simulator engines and a router in one process.

No sockets and no real time: one VirtualClock drives every engine (simulator.engine), the
workload's arrivals, and a metrics refresh every 50 ms of virtual time that publishes
`Metrics` snapshots on the endpoints exactly as the picker's scraper would. The picker
strategies run the real pipeline (config, scheduler, plugins, prefix index) on those
endpoints with the virtual clock, and maintain in-flight counts like the director.

Strategies:
  round-robin      Envoy's ROUND_ROBIN
  random           uniform choice
  least-queue      fewest outstanding requests sent by this router (Envoy's LEAST_REQUEST
                   idea, full scan, random tie-break)
  picker           the picker's default configuration
  picker-random    the picker with a random-picker configuration
  picker:<path>    the picker with that EndpointPickerConfig file
  oracle           knows every engine's true cache contents (plus the blocks of requests
                   already routed there and not yet prefilled) and pending prefill work;
                   picks the least estimated time to first token = queue wait + uncached
                   prefill time, with the uncached prefill charged once more for the
                   requests it delays (a bound on what routing can achieve, not a proof).

Prefill/decode disaggregation: ClusterConfig.roles gives each server a role (prefill, decode,
both), published as the endpoint label `llm-d.ai/role` (what the picker's prefill-filter and
decode-filter read). When a picker decision carries `x-prefiller-host-port`, the request runs
the routing sidecar's sequence in virtual time (simulator.pd.disaggregate: a one-token prefill
on that server, the KV pulled over the decode server's link, decode there); TTFT then includes
the prefill server's queue, the prefill and the KV transfer. The result counts P/D requests,
local fallbacks and each server's work by role (Engine.stats().requests_by_role).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.loadgen import Progress, RequestResult, Summary
from bench.strategies import picker_config
from bench.workloads import LoadSpec, WorkItem, arrival_times
from epp.errors import InferenceError
from epp.framework import Endpoint, InferenceRequest, Metrics, PluginHandle, ResponseInfo
from epp.framework.types import PREFILLER_HEADER, ROLE_LABEL
from epp.requestcontrol.headers import apply as apply_headers
from epp.requestcontrol.inflight import InFlightCharge
from epp.requestcontrol.parsers.openai import parse_body
from simulator.clock import VirtualClock
from simulator.engine import Engine, EngineConfig, EngineLoop, EngineRequest, PromptTooLong, block_hashes
from simulator.hardware import HARDWARE, engine_config
from simulator.pd import PDRequest, disaggregate
from simulator.tokenizer import apply_chat_template, encode

_SSE_HEADERS = {"content-type": "text/event-stream"}
_JSON_HEADERS = {"content-type": "application/json"}

BASE_STRATEGIES = ("round-robin", "random", "least-queue", "picker", "picker-random", "oracle")
ROLES = ("prefill", "decode", "both")


@dataclass(slots=True)
class ClusterConfig:
    servers: int = 8
    engine: EngineConfig = field(default_factory=EngineConfig)
    scrape_interval: float = 0.05  # virtual seconds between metrics refreshes (the picker's default)
    seed: int = 1
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    # Wall seconds a real request spends outside the engine before its first token can
    # start (client, Envoy, the picker's ext_proc round trip, HTTP front); measured by
    # `epp bench agree`, 0 for a pure engine + routing model.
    gateway_latency: float = 0.0
    # One role per server (prefill | decode | both), labelled llm-d.ai/role on its endpoint;
    # empty: no role labels (every server aggregated).
    roles: tuple[str, ...] = ()
    # One hardware class per server (simulator.hardware.HARDWARE, labels included); empty: `engine` for all.
    hardware: tuple[str, ...] = ()
    # Record every gap between consecutive tokens as the request's ITL samples (as the load
    # generator measures streamed chunks); False: one sample per request, its mean.
    token_itl: bool = False

    def __post_init__(self) -> None:
        for name, values, known in (("roles", self.roles, ROLES), ("hardware", self.hardware, tuple(HARDWARE))):
            if values and len(values) != self.servers:
                raise ValueError(f"{name}: {len(values)} given for {self.servers} servers")
            for v in values:
                if v not in known:
                    raise ValueError(f"{name}: unknown {v!r} (known: {', '.join(known)})")

    def engine_configs(self) -> list[EngineConfig]:
        if not self.hardware:
            return [self.engine] * self.servers
        e = self.engine
        return [engine_config(h, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                              block_size=e.block_size, max_model_len=e.max_model_len) for h in self.hardware]

    def labels(self, i: int) -> dict[str, str]:
        out = dict(HARDWARE[self.hardware[i]].labels()) if self.hardware else {}
        if self.roles:
            out[ROLE_LABEL] = self.roles[i]
        return out


@dataclass(slots=True)
class PDCounts:
    """Disaggregation in one run: requests the picker sent P/D, those the decoder had to
    prefill itself, and each server's requests by the role it played (the engines' counters)."""

    requests: int = 0  # decisions carrying a prefill endpoint (other than the decode endpoint)
    local_fallbacks: int = 0  # the prefill copy ended without held blocks: prefilled on the decoder
    kv_bytes: int = 0  # pulled by decoders
    by_role: list[dict[str, int]] = field(default_factory=list)  # per server: both | prefill | decode
    prompt_tokens_by_source: list[dict[str, int]] = field(default_factory=list)  # per server


@dataclass(slots=True)
class ClusterResult:
    strategy: str
    results: list[RequestResult]
    duration: float  # virtual seconds, first arrival to last completion
    per_server: list[int]  # requests served per server
    hit_rate: float  # prefix-cache hits / queries in tokens, summed over engines
    wall_seconds: float
    routing_seconds: float  # wall time spent in routing decisions
    in_flight_at_end: int = 0  # requests the router still counts in flight after the run (must be 0)
    pd: PDCounts = field(default_factory=PDCounts)

    def summary(self) -> Summary:
        return Summary.of(self.results, self.duration)


@dataclass(slots=True)
class _Prompt:
    """A prompt tokenised and hashed once, shared by every request that sends it."""

    token_ids: list[int]
    hashes: list[int]
    body: bytes


class _Prompts:
    def __init__(self, block_size: int, base_model: str) -> None:
        self.block_size = block_size
        self.base_model = base_model  # requests naming another model use it as a LoRA adapter
        self._cache: dict[tuple, _Prompt] = {}
        self._segments: dict[tuple[str, str], list[int]] = {}
        self._head = encode(apply_chat_template([], add_generation_prompt=False))
        self._tail = encode(apply_chat_template([], add_generation_prompt=True))[len(self._head):]

    def token_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """encode(apply_chat_template(messages)), with each message's tokens computed once:
        every templated message starts and ends with a special token, so the encoding of
        the whole prompt is the concatenation of the messages' encodings."""
        ids = list(self._head)
        segs = self._segments
        for m in messages:
            key = (m["role"], m["content"])
            seg = segs.get(key)
            if seg is None:
                seg = segs[key] = encode(apply_chat_template([m], add_generation_prompt=False))[len(self._head):]
            ids += seg
        ids += self._tail
        return ids

    def get(self, item: WorkItem) -> _Prompt:
        key = (item.model, item.max_tokens, *(m["content"] for m in item.messages))
        p = self._cache.get(key)
        if p is None:
            ids = self.token_ids(item.messages)
            lora = None if item.model == self.base_model else item.model
            p = _Prompt(ids, block_hashes(ids, self.block_size, lora), orjson.dumps(item.body(stream=True)))
            self._cache[key] = p
        return p


# --------------------------------------------------------------------------- routers
class Router:
    """Chooses a server index for a request; told when it completes."""

    name = "router"
    prefill: int | None = None  # set by route(): the server to prefill the request on (P/D), if any

    def route(self, item: WorkItem, prompt: _Prompt, request: InferenceRequest | None) -> int:
        raise NotImplementedError

    def received(self, server: int, request: InferenceRequest | None, info: ResponseInfo) -> None:
        """The server's response headers arrived (a streaming server sends them on accepting)."""

    def first_token(self, server: int, request: InferenceRequest | None) -> None:
        """The first streamed chunk arrived (the director's first response_body call)."""

    def complete(self, server: int, item: WorkItem, prompt: _Prompt, request: InferenceRequest | None,
                 info: ResponseInfo) -> None:
        pass

    needs_request = False  # whether route() wants the parsed InferenceRequest


class RoundRobin(Router):
    def __init__(self, n: int) -> None:
        self.n = n
        self.next = 0

    def route(self, item, prompt, request) -> int:
        i = self.next
        self.next = (i + 1) % self.n
        return i


class RandomRouter(Router):
    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.rng = rng

    def route(self, item, prompt, request) -> int:
        return self.rng.randrange(self.n)


class LeastQueue(Router):
    def __init__(self, n: int, rng: random.Random) -> None:
        self.outstanding = [0] * n
        self.rng = rng

    def route(self, item, prompt, request) -> int:
        out = self.outstanding
        low = min(out)
        ties = [i for i, c in enumerate(out) if c == low]
        i = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        out[i] += 1
        return i

    def complete(self, server, item, prompt, request, info) -> None:
        self.outstanding[server] -= 1


class PickerRouter(Router):
    """The real pipeline on the simulated endpoints, with the director's in-flight
    bookkeeping (epp.requestcontrol.inflight, the piece the director itself uses) and the
    response hooks."""

    needs_request = True

    def __init__(self, endpoints: list[Endpoint], config_text: str | None, clock: VirtualClock,
                 rng: random.Random) -> None:
        from epp.assembly import load_plugin_set

        self.endpoints = endpoints
        self.index = {id(e): i for i, e in enumerate(endpoints)}
        self.by_hostport = {e.hostport: i for i, e in enumerate(endpoints)}
        self.pipeline = load_plugin_set(config_text, PluginHandle(clock=clock.now, rng=rng))
        for plugin in self.pipeline.plugins.values():  # virtual time: learn inline, never in a thread
            if hasattr(plugin, "background_training"):
                plugin.background_training = False
        self.charges: dict[int, InFlightCharge] = {}  # WorkItem.index -> its charge; at most the items in flight

    def route(self, item, prompt, request) -> int:
        _, result = self.pipeline.run_cycle(request, self.endpoints)
        target = result.targets[0]
        self.charges[item.index] = InFlightCharge.add(target, request)
        prefiller = result.headers.get(PREFILLER_HEADER)
        self.prefill = None if prefiller is None else self.by_hostport[prefiller.split(",")[0].strip()]
        return self.index[id(target)]

    def received(self, server, request, info) -> None:
        info.served_endpoint = self.endpoints[server].hostport
        self.pipeline.response_received(request, info, self.endpoints[server])

    def first_token(self, server, request) -> None:
        if self.pipeline.wants_response_body:
            target = self.endpoints[server]
            info = ResponseInfo(status=200, headers=_SSE_HEADERS, served_endpoint=target.hostport)
            self.pipeline.response_streaming(request, info, target)

    def complete(self, server, item, prompt, request, info) -> None:
        target = self.endpoints[server]
        self.charges.pop(item.index).release()
        info.served_endpoint = target.hostport
        if self.pipeline.wants_response_body:  # the director runs these per chunk; the last one here
            self.pipeline.response_streaming(request, info, target)
        self.pipeline.response_complete(request, info, target)


class Oracle(Router):
    """Least estimated TTFT from the engines' true state (see module docstring)."""

    prefill_weight = 2.0

    def __init__(self, engines: list[Engine], rng: random.Random) -> None:
        self.engines = engines
        self.rng = rng
        n = len(engines)
        self.pending_tokens = [0] * n  # uncached prompt tokens routed and not yet prefilled
        self.pending_blocks: list[dict[int, int]] = [{} for _ in range(n)]  # hash -> routed requests holding it
        self.routed: dict[int, tuple[int, int, list[int]]] = {}

    def estimate(self, i: int, prompt: _Prompt) -> tuple[float, int]:
        e = self.engines[i]
        cfg = e.config
        cached = e.is_cached  # the engine's true cache contents
        pend = self.pending_blocks[i]
        hit = 0
        limit = (len(prompt.token_ids) - 1) // cfg.block_size
        for h in prompt.hashes:
            if hit >= limit or (h not in pend and not cached(h)):
                break
            hit += 1
        uncached = len(prompt.token_ids) - hit * cfg.block_size
        work = self.pending_tokens[i] + uncached
        steps = math.ceil(work / cfg.max_num_batched_tokens)
        running = len(e.running) + len(e.waiting)
        step_time = cfg.step_overhead + min(running, cfg.max_num_seqs) * cfg.decode_time_per_seq
        wait = work * cfg.prefill_time_per_token + steps * step_time
        # The request's own uncached prefill also delays everything queued behind it on
        # that server: charging it once more keeps prefixes together (pure greedy TTFT
        # scatters them onto idle servers and loses to the picker).
        wait += self.prefill_weight * uncached * cfg.prefill_time_per_token
        if running >= cfg.max_num_seqs:  # no sequence slot: wait for the shortest remaining request
            wait += 64 * step_time
        return wait, uncached

    def choose(self, item: WorkItem, prompt: _Prompt) -> int:
        best = math.inf
        choice: list[int] = []
        for i in range(len(self.engines)):
            est, _ = self.estimate(i, prompt)
            if est < best - 1e-12:
                best = est
                choice = [i]
            elif abs(est - best) <= 1e-12:
                choice.append(i)
        return choice[0] if len(choice) == 1 else choice[self.rng.randrange(len(choice))]

    def route(self, item, prompt, request) -> int:
        i = self.choose(item, prompt)  # a subclass may choose otherwise; the bookkeeping stays
        _, uncached = self.estimate(i, prompt)
        self.pending_tokens[i] += uncached
        pend = self.pending_blocks[i]
        for h in prompt.hashes:
            pend[h] = pend.get(h, 0) + 1
        self.routed[item.index] = (i, uncached, prompt.hashes)
        return i

    def prefilled(self, index: int) -> None:
        i, uncached, hashes = self.routed.pop(index)
        self.pending_tokens[i] -= uncached
        pend = self.pending_blocks[i]
        for h in hashes:
            c = pend[h] - 1
            if c:
                pend[h] = c
            else:
                del pend[h]


# --------------------------------------------------------------------------- the simulation
def _metrics(engine: Engine, now: float, with_lora: bool) -> Metrics:
    cfg = engine.config
    if with_lora:
        s = engine.stats()
        return Metrics(s.num_requests_waiting, s.num_requests_running, s.kv_cache_usage_perc,
                       frozenset(s.running_lora_adapters), frozenset(s.waiting_lora_adapters), cfg.max_loras,
                       cfg.block_size, cfg.num_gpu_blocks, now, True)
    return Metrics(len(engine.waiting), len(engine.running), engine.kv_cache_usage(), frozenset(), frozenset(),
                   cfg.max_loras, cfg.block_size, cfg.num_gpu_blocks, now, True)


# Further strategies by name (e.g. bench.goodput's): factory(clock, engines, endpoints, rng) -> Router.
EXTRA_ROUTERS: dict[str, Callable[[VirtualClock, list[Engine], list[Endpoint], random.Random], Router]] = {}


def make_router(strategy: str, clock: VirtualClock, engines: list[Engine], endpoints: list[Endpoint],
                rng: random.Random) -> Router:
    n = len(engines)
    if strategy in EXTRA_ROUTERS:
        return EXTRA_ROUTERS[strategy](clock, engines, endpoints, rng)
    if strategy == "round-robin":
        return RoundRobin(n)
    if strategy == "random":
        return RandomRouter(n, rng)
    if strategy == "least-queue":
        return LeastQueue(n, rng)
    if strategy == "oracle":
        return Oracle(engines, rng)
    if strategy.startswith("picker"):
        return PickerRouter(endpoints, picker_config(strategy, BASE_STRATEGIES), clock, rng)
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(BASE_STRATEGIES)}, picker:<config file>)")


def simulate(strategy: str, items: Sequence[WorkItem], load: LoadSpec, cfg: ClusterConfig, *,
             time_scale: float = 1.0, progress: Progress | None = None,
             on_scrape: Callable[[float, Sequence[Engine]], None] | None = None,
             on_route: Callable[[float, WorkItem, int], None] | None = None) -> ClusterResult:
    """Run `items` through cfg.servers engines with `strategy`. `load.rate` is in requests per
    wall second of a real run at `time_scale` (virtual rate = rate / time_scale); results are
    in virtual seconds (divide by time_scale for the wall-clock equivalent). `on_scrape(now,
    engines)` is called at each metrics refresh (e.g. to record queues over time),
    `on_route(now, item, server)` after each routing decision."""
    wall0 = time.perf_counter()
    clock = VirtualClock()
    # The picker scrapes every scrape_interval of wall time, i.e. scrape_interval * time_scale
    # of the servers' simulated time.
    scrape_interval = cfg.scrape_interval * time_scale
    rng = random.Random(cfg.seed)
    engines = [Engine(c) for c in cfg.engine_configs()]
    loops = [EngineLoop(e, clock) for e in engines]
    endpoints = [Endpoint(name=f"sim-{i}", address="10.0.0.1", port=8000 + i, labels=cfg.labels(i))
                 for i in range(cfg.servers)]
    router = make_router(strategy, clock, engines, endpoints, rng)
    oracle = router if isinstance(router, Oracle) else None
    prompts = _Prompts(cfg.engine.block_size, cfg.model)
    with_lora = any(it.model != cfg.model for it in items)
    results: list[RequestResult] = []
    per_server = [0] * cfg.servers
    state = {"outstanding": 0, "arrived": 0, "routing": 0.0, "errors": 0}
    pd = PDCounts()
    pd_runs: list[PDRequest] = []
    total = len(items)
    # Turns of a session wait for the previous turn (as the load generator does).
    next_turn: dict[tuple[int, int], WorkItem] = {(it.session, it.turn): it for it in items if it.session >= 0}
    done_turns: set[tuple[int, int]] = set()
    deferred: dict[tuple[int, int], float] = {}
    # Closed loop: each finished request releases the next one at once.
    closed_queue = list(reversed(items)) if load.type == "concurrency" else []

    def scrape() -> None:
        now = clock.now()
        for e, ep in zip(engines, endpoints, strict=True):
            ep.metrics = _metrics(e, now, with_lora)
        if on_scrape is not None:
            on_scrape(now, engines)
        if state["outstanding"] or state["arrived"] < total:
            clock.call_at(now + scrape_interval, scrape)

    def finish_item(item: WorkItem) -> None:
        if item.session >= 0:
            key = (item.session, item.turn)
            done_turns.add(key)
            nxt = (item.session, item.turn + 1)
            if nxt in deferred:
                deferred.pop(nxt)
                follow = next_turn[nxt]
                clock.call_at(clock.now() + follow.think_time, lambda f=follow: arrive(f))
        if closed_queue:
            nxt = closed_queue.pop()
            clock.call_at(clock.now(), lambda n=nxt: arrive(n))

    latency = cfg.gateway_latency * time_scale

    def arrive(item: WorkItem) -> None:
        if item.session >= 0 and item.turn > 0 and (item.session, item.turn - 1) not in done_turns:
            deferred[(item.session, item.turn)] = clock.now()
            return
        if latency > 0:
            sent = clock.now()
            clock.call_at(sent + latency, lambda: dispatch(item, sent))
        else:
            dispatch(item, clock.now())

    def dispatch(item: WorkItem, now: float) -> None:
        """Route and submit `item`, sent by the client at `now`."""
        state["arrived"] += 1
        prompt = prompts.get(item)
        res = RequestResult(index=item.index, start=now, group=item.group)
        request = None
        t0 = time.perf_counter()
        try:
            if router.needs_request:
                request = parse_body(prompt.body, f"req-{item.index}", "/v1/chat/completions")
                if item.headers:  # as the director hands a parsed request its headers
                    apply_headers(request, {**request.headers, **item.headers})
            server = router.route(item, prompt, request)
            prefill = router.prefill
        except InferenceError as e:
            state["routing"] += time.perf_counter() - t0
            res.status, res.error = e.http_status, str(e)
            results.append(res)
            state["errors"] += 1
            finish_item(item)
            return
        state["routing"] += time.perf_counter() - t0
        if on_route is not None:
            on_route(clock.now(), item, server)
        per_server[server] += 1
        state["outstanding"] += 1
        first = [0.0]
        gaps: list[float] = []
        pd_state: list[PDRequest | None] = [None]
        last: list[float | None] = [None]

        def on_first(t: float, cached: int) -> None:
            res.ttft = t - now
            st = pd_state[0]
            # a P/D response's usage reports the prefiller's cached tokens (as the routing sidecar rewrites it)
            res.cached_tokens = st.prefill_cached_tokens if st is not None and not st.local_fallback else cached
            first[0] = t
            if oracle is not None:
                oracle.prefilled(item.index)
            router.first_token(server, request)

        def on_finish(t: float, reason: str) -> None:
            res.e2e = t - now
            res.status = 200
            res.output_tokens = item.max_tokens
            res.prompt_tokens = len(prompt.token_ids)
            if cfg.token_itl:
                res.itl = gaps
            elif item.max_tokens > 1:
                res.itl = [(t - first[0]) / (item.max_tokens - 1)]
            results.append(res)
            state["outstanding"] -= 1
            info = ResponseInfo(status=200, prompt_tokens=res.prompt_tokens, completion_tokens=res.output_tokens,
                                cached_tokens=res.cached_tokens, end_of_stream=True)
            router.complete(server, item, prompt, request, info)
            finish_item(item)
            if progress is not None:
                progress.update(len(results), state["errors"])

        lora = None if item.model == cfg.model else item.model
        def on_token(t: float, _token: int) -> None:
            if last[0] is not None:
                gaps.append(t - last[0])
            last[0] = t

        req = EngineRequest(f"req-{item.index}", prompt.token_ids, item.max_tokens, lora=lora,
                            on_first_token=on_first, on_finish=on_finish, block_hashes=prompt.hashes,
                            on_token=on_token if cfg.token_itl else None)
        try:
            if prefill is not None and prefill != server:
                pd_state[0] = disaggregate(loops[prefill], loops[server], req)
                pd_runs.append(pd_state[0])
                pd.requests += 1
            else:
                loops[server].submit(req)
        except PromptTooLong as e:
            state["outstanding"] -= 1
            res.status, res.error = 400, str(e)
            results.append(res)
            router.received(server, request, ResponseInfo(status=400, headers=_JSON_HEADERS))
            router.complete(server, item, prompt, request, ResponseInfo(status=400, end_of_stream=True))
            finish_item(item)
            return
        router.received(server, request, ResponseInfo(status=200, headers=_SSE_HEADERS))

    if load.type == "concurrency":
        for _ in range(min(load.concurrency, len(closed_queue))):
            it = closed_queue.pop()
            clock.call_at(0.0, lambda i=it: arrive(i))
    else:
        for it, at in zip(items, arrival_times(len(items), load.rate / time_scale, cfg.seed), strict=True):
            clock.call_at(at, lambda i=it: arrive(i))
    clock.call_at(0.0, scrape)
    clock.run_until_idle()
    if progress is not None:
        progress.close()
    results.sort(key=lambda r: r.index)
    first_arrival = min((r.start for r in results), default=0.0)
    last_done = max((r.start + r.e2e for r in results if r.ok), default=0.0)
    hits = sum(e.prefix_cache_hits_total for e in engines)
    queries = sum(e.prefix_cache_queries_total for e in engines)
    pd.local_fallbacks = sum(r.local_fallback for r in pd_runs)
    pd.kv_bytes = sum(e.kv_bytes_received_total for e in engines)
    pd.by_role = [dict(e.requests_by_role) for e in engines]
    pd.prompt_tokens_by_source = [dict(e.prompt_tokens_by_source) for e in engines]
    return ClusterResult(strategy, results, last_done - first_arrival, per_server,
                         hits / queries if queries else math.nan, time.perf_counter() - wall0, state["routing"],
                         sum(ep.in_flight for ep in endpoints), pd)


def scaled(result: ClusterResult, time_scale: float) -> ClusterResult:
    """The result in wall-clock seconds of a real run at `time_scale`."""
    if time_scale == 1.0:
        return result
    rs = []
    for r in result.results:
        rs.append(RequestResult(r.index, r.start / time_scale, None if r.ttft is None else r.ttft / time_scale,
                                r.e2e / time_scale, [x / time_scale for x in r.itl], r.output_tokens,
                                r.prompt_tokens, r.cached_tokens, r.status, r.error, r.group))
    return ClusterResult(result.strategy, rs, result.duration / time_scale, result.per_server, result.hit_rate,
                         result.wall_seconds, result.routing_seconds, result.in_flight_at_end, result.pd)


def run_strategies(strategies: Sequence[str], items: Sequence[WorkItem], load: LoadSpec, cfg: ClusterConfig, *,
                   time_scale: float = 1.0, show_progress: bool = True,
                   on_result: Callable[[ClusterResult], None] | None = None) -> list[ClusterResult]:
    out = []
    for s in strategies:
        progress = Progress(f"cluster {s:<14}", len(items)) if show_progress else None
        r = simulate(s, items, load, cfg, time_scale=time_scale, progress=progress)
        out.append(r)
        if on_result:
            on_result(r)
    return out


# --------------------------------------------------------------------------- aggregated vs P/D
PD_CONFIG = str(Path(__file__).parent / "examples" / "pd-disaggregation.yaml")


@dataclass(frozen=True, slots=True)
class PDSetup:
    """One side of the aggregated-vs-P/D comparison: a name, a picker strategy, server roles."""

    name: str
    strategy: str
    roles: tuple[str, ...]


def parse_split(text: str, servers: int) -> tuple[int, int]:
    """"P:D" prefill:decode servers, summing to `servers`, each at least 1."""
    p, sep, d = text.partition(":")
    try:
        np_, nd = int(p), int(d)
    except ValueError:
        raise ValueError(f"split {text!r}: expected prefill:decode, e.g. 1:3") from None
    if not sep or np_ < 1 or nd < 1 or np_ + nd != servers:
        raise ValueError(f"split {text!r}: needs at least one of each and {servers} servers in all")
    return np_, nd


def pd_setups(servers: int, splits: Sequence[str], pd_config: str = PD_CONFIG,
              aggregated: str = "picker") -> list[PDSetup]:
    """Aggregated (every server role both, the `aggregated` picker strategy) and one P/D setup
    per split (prefill servers first, the P/D picker config)."""
    out = [PDSetup("aggregated", aggregated, ("both",) * servers)]
    for split in splits:
        np_, nd = parse_split(split, servers)
        out.append(PDSetup(f"P/D {np_}:{nd}", f"picker:{pd_config}", ("prefill",) * np_ + ("decode",) * nd))
    return out
