"""Routing behaviour end to end: the real Envoy 1.40 binary in front of the picker (`epp serve`)
and real `epp sim` servers. Every landing is counted by the servers themselves (their
/metrics), and every assertion is one that random or round-robin routing would fail:

- requests sharing a long prefix stick to one server while the groups spread out;
- a LoRA request goes to the server running its adapter;
- a server with a long waiting queue is avoided;
- a sheddable request gets 429 while the pool is saturated, a non-sheddable one still succeeds;
- a server that died stops being picked once its metrics are stale.

Synchronisation is by polling the picker's own view of the pool (the project API's
ListEndpoints) or the servers' metrics, never by sleeping.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from devstack.launch import port_open, wait_until
from proto import epp_api_pb2 as pb
from tests.e2e.api import by_port, list_endpoints, objectives, write_endpoints
from tests.e2e.conftest import Logs, Picker, SimServers, _failed, _start_sims, metric_sum, post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OBJECTIVE_HEADER = "x-gateway-inference-objective"
POLL = 0.05  # seconds between polls of the picker's API (each poll opens a channel)


# --------------------------------------------------------------------------- helpers
def run_concurrently(fn: Callable[[int], tuple[int, dict[str, str], bytes]], n: int,
                     concurrency: int) -> list[tuple[int, dict[str, str], bytes]]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(fn, range(n)))


def pool_view(p: Picker) -> dict[str, pb.EndpointInfo]:
    """The picker's own view of its endpoints (project API on the ext_proc port), by ip:port."""
    return {f"{e.address}:{e.port}": e for e in list_endpoints(p.api_port).endpoints}


def in_flight(p: Picker) -> dict[str, int]:
    """Requests in flight per endpoint (ip:port), as the picker counts them."""
    return {hp: e.in_flight_requests for hp, e in pool_view(p).items()}


def wait_for_view(p: Picker, predicate: Callable[[dict[str, pb.EndpointInfo]], bool], what: str,
                  timeout: float = 30) -> None:
    wait_until(lambda: predicate(pool_view(p)), timeout, what, interval=POLL)


def fresh(e: pb.EndpointInfo, max_age: float = 1.0) -> bool:
    return e.metrics.ok and 0 <= e.metrics.age_seconds <= max_age


def counters(sims: SimServers, name: str) -> list[float]:
    return [metric_sum(sims.metrics(i), name) for i in range(sims.n)]


def delta(after: Sequence[float], before: Sequence[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


class Backlog:
    """Requests sent straight to a server (not through Envoy, so the picker does not count
    them) and left running: the server's own queue is what the picker must notice. The
    sockets stay open until close(); nothing is read."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def add(self, hostport: str, body: dict, n: int = 1) -> None:
        host, _, port = hostport.rpartition(":")
        data = json.dumps(body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=5)
            self.socks.append(s)
            s.sendall(head + data)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


@pytest.fixture
def backlog() -> Iterator[Backlog]:
    b = Backlog()
    try:
        yield b
    finally:
        b.close()


# --------------------------------------------------------------------------- 1. prefix affinity
# Group g asks for max_tokens MAX_TOKENS[g]: each value falls in its own bucket of the servers'
# vllm:request_params_max_tokens histogram (1-2-5 buckets), so every server reports, by
# itself, how many requests of each group it served.
# Eight groups: the first request of a group is cold everywhere and the tie is broken at
# random, so all groups would land on one server with probability 3^-7.
MAX_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200)
GROUP_REQUESTS = 8
WORDS = ("policy customer refund shipping warranty invoice account billing support ticket escalation agent "
         "priority response template greeting closing apology verify identity order status delivery carrier "
         "tracking return label exchange store credit discount coupon subscription renewal cancel").split()


def system_prompt(salt: str, group: int, chars: int = 4000) -> str:
    rng = random.Random(f"{salt}/{group}")
    text = f"System prompt {salt} group {group}. You are a support agent. Rules:"
    while len(text) < chars:
        text += " " + rng.choice(WORDS)
    return text


def per_group_landing(before: list[dict[float, float]], after: list[dict[float, float]]) -> list[list[int]]:
    """[group][server] -> requests, from the servers' max_tokens histogram bucket deltas."""
    out = []
    for g, le in enumerate(MAX_TOKENS):
        prev = MAX_TOKENS[g - 1] if g else None
        row = []
        for b, a in zip(before, after, strict=True):
            n = (a[le] - b[le]) - ((a[prev] - b[prev]) if prev is not None else 0)
            row.append(round(n))
        out.append(row)
    return out


def max_tokens_buckets(sims: SimServers) -> list[dict[float, float]]:
    out = []
    for i in range(sims.n):
        buckets = {}
        for line in sims.metrics(i).splitlines():
            if line.startswith("vllm:request_params_max_tokens_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                if le != "+Inf":
                    buckets[float(le)] = float(line.rsplit(" ", 1)[1])
        out.append(buckets)
    return out


@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_shared_prefix_sticks_to_one_server_and_groups_spread(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports)  # default config: queue 2, kv-cache 2, prefix-cache 3
    env = envoy(mode, p)
    url = f"{env.url}/v1/completions"
    groups = len(MAX_TOKENS)
    prompts = [system_prompt(mode, g) for g in range(groups)]
    # Interleaved (g0 r0, g1 r0, ...) so that concurrent requests are mostly of different groups.
    order = [(g, i) for i in range(GROUP_REQUESTS) for g in range(groups)]

    def one(k: int) -> tuple[int, dict[str, str], bytes]:
        g, i = order[k]
        body = {"model": "m1", "prompt": f"{prompts[g]}\nUser: question {i} about case {g * 100 + i}?",
                "max_tokens": MAX_TOKENS[g]}
        return post(url, body)

    buckets0 = max_tokens_buckets(sims)
    hit_requests0 = counters(sims, "sim_prefix_cache_hit_requests_total")
    hits0 = counters(sims, "vllm:prefix_cache_hits_total")
    results = run_concurrently(one, len(order), concurrency=4)
    assert [r[0] for r in results] == [200] * len(order), [r for r in results if r[0] != 200][:3]

    landing = per_group_landing(buckets0, max_tokens_buckets(sims))
    assert [sum(row) for row in landing] == [GROUP_REQUESTS] * groups, landing
    # Each group's requests land (almost) all on one server: random routing over three
    # servers would put about a third of them on each.
    owners = []
    for row in landing:
        assert max(row) >= GROUP_REQUESTS - 1, landing
        owners.append(row.index(max(row)))
    # ... and the groups are spread over the servers, not all piled on one.
    assert len(set(owners)) >= 2, landing

    # The servers' prefix caches agree. With affinity only a group's first request is cold:
    # groups x (N - 1) requests reuse cached blocks; round-robin would leave every group cold
    # once per server, groups x (N - 3).
    hit_requests = sum(delta(counters(sims, "sim_prefix_cache_hit_requests_total"), hit_requests0))
    assert hit_requests >= groups * (GROUP_REQUESTS - 1) - 2, hit_requests
    assert hit_requests > groups * (GROUP_REQUESTS - 3)
    # Cached tokens: each warm request reuses the whole system prompt but its last block
    # (the block that straddles into the question differs per request).
    tokens = [post(f"http://{sims.hostports[0]}/tokenize", {"model": "m1", "prompt": t}) for t in prompts]
    prefix_tokens = min(json.loads(body)["count"] for _, _, body in tokens)
    block = 16
    cached_per_warm = (prefix_tokens // block - 1) * block
    hits = sum(delta(counters(sims, "vllm:prefix_cache_hits_total"), hits0))
    assert hits >= (groups * (GROUP_REQUESTS - 1) - 2) * cached_per_warm, (hits, cached_per_warm)
    round_robin_hits = groups * (GROUP_REQUESTS - 3) * (prefix_tokens // block) * block
    assert hits > round_robin_hits, (hits, round_robin_hits)


# --------------------------------------------------------------------------- 2. LoRA affinity
LORA_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: lora-affinity-scorer, weight: 10}, {pluginRef: queue-scorer, weight: 2},
            {pluginRef: kv-cache-utilization-scorer, weight: 2}, {pluginRef: prefix-cache-scorer, weight: 3}]
"""
ADAPTERS = ("sql-a", "sql-b", "sql-c")


def test_lora_request_goes_to_the_server_running_its_adapter(sim_servers, picker, envoy, backlog):
    """Three servers, each knowing only its own adapter (another adapter gets 404 from it),
    max one adapter in the batch. A long request per server keeps its adapter running, so
    vllm:lora_requests_info reports it; the routed adapter requests must all go there."""
    # 50 ms engine steps at real time: the anchors (2000 tokens) run for 100 s, the routed
    # requests (2 tokens) take ~0.15 s.
    servers = [sim_servers(1, model="base", time_scale=1, lora_modules=a, max_loras=1, step_overhead=0.05)
               for a in ADAPTERS]
    hostports = [s.hostports[0] for s in servers]
    for hp, adapter in zip(hostports, ADAPTERS, strict=True):
        backlog.add(hp, {"model": adapter, "prompt": f"anchor for {adapter}", "max_tokens": 2000})
    p = picker(endpoints=hostports, config_text=LORA_CONFIG)
    env = envoy("full-duplex", p)
    wait_for_view(p, lambda v: all(list(v[hp].metrics.running_lora_adapters) == [a] and v[hp].metrics.max_lora == 1
                                   for hp, a in zip(hostports, ADAPTERS, strict=True)),
                  "the picker to see each server running its adapter")

    per_adapter = 8
    order = [ADAPTERS[k % 3] for k in range(3 * per_adapter)]
    url = f"{env.url}/v1/completions"

    def one(k: int) -> tuple[int, dict[str, str], bytes]:
        return post(url, {"model": order[k], "prompt": f"lora request {k}", "max_tokens": 2})

    before = [sum(s.served()) for s in servers]
    results = run_concurrently(one, len(order), concurrency=4)
    # A request sent to a server without its adapter would come back 404.
    assert [r[0] for r in results] == [200] * len(order), [r for r in results if r[0] != 200][:3]
    assert all(json.loads(r[2])["model"] == order[k] for k, r in enumerate(results))
    served = delta([sum(s.served()) for s in servers], before)
    assert served == [per_adapter] * 3, served


# --------------------------------------------------------------------------- 3 + 4. overload
@dataclass
class OverloadedPool:
    idle: SimServers  # two ordinary servers
    hot: SimServers  # one server with a single sequence slot and a long waiting queue
    waiting: int

    @property
    def hostports(self) -> list[str]:
        return [*self.idle.hostports, *self.hot.hostports]


@pytest.fixture(scope="module")
def overloaded_pool(request: pytest.FixtureRequest) -> Iterator[OverloadedPool]:
    """Shared by the overload and shedding tests; neither sends anything to the hot server
    (that is what they assert), so its queue stays as it was set up."""
    logs = Logs()
    started: list[SimServers] = []
    backlog = Backlog()
    try:
        idle = _start_sims(logs, 2, "m1", 20.0, {})
        started.append(idle)
        # One sequence slot and 50 ms steps: the first backlog request runs for ~200 s,
        # the other 20 wait behind it.
        hot = _start_sims(logs, 1, "m1", 1.0, {"max_num_seqs": 1, "step_overhead": 0.05})
        started.append(hot)
        waiting = 20
        backlog.add(hot.hostports[0], {"model": "m1", "prompt": "a long job", "max_tokens": 4000}, waiting + 1)
        wait_until(lambda: metric_sum(hot.metrics(0), "vllm:num_requests_waiting") == waiting, 30,
                   "the hot server's queue to fill")
        yield OverloadedPool(idle, hot, waiting)
    finally:
        backlog.close()
        for s in started:
            s.stop()
        if _failed(request):
            logs.dump()
        logs.cleanup()


def hot_queue_seen(pool: OverloadedPool) -> Callable[[dict[str, pb.EndpointInfo]], bool]:
    hot = pool.hot.hostports[0]
    return lambda v: (hot in v and v[hot].metrics.waiting_queue_size >= pool.waiting
                      and all(fresh(v[hp]) for hp in pool.hostports if hp in v))


@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_overloaded_server_is_avoided(mode, overloaded_pool, picker, envoy):
    pool = overloaded_pool
    p = picker(endpoints=pool.hostports)  # default config
    env = envoy(mode, p)
    wait_for_view(p, hot_queue_seen(pool), "the picker to see the hot server's queue")
    url = f"{env.url}/v1/completions"
    n = 30

    def one(k: int) -> tuple[int, dict[str, str], bytes]:
        # A request sent to the hot server would wait ~200 s: the timeout makes that a failure.
        return post(url, {"model": "m1", "prompt": f"overload check {mode} {k}", "max_tokens": 2}, timeout=10)

    idle0, hot0 = pool.idle.served(), counters(pool.hot, "sim_requests_total")
    results = run_concurrently(one, n, concurrency=5)
    assert [r[0] for r in results] == [200] * n
    # Random routing would send a third of them to the hot server; the picker sends none.
    assert delta(counters(pool.hot, "sim_requests_total"), hot0) == [0]
    assert sum(delta(pool.idle.served(), idle0)) == n


def test_sheddable_request_gets_429_while_saturated(overloaded_pool, picker, envoy, e2e_logs):
    """Legacy admission: priority < 0 and saturation >= 1 -> 429. Saturation is the mean over
    the pool of max(queue/5, kv/0.8): (20/5 + 0 + 0) / 3 = 1.33 with the hot server in the
    pool, 0 without it. The endpoints file is edited live to add the hot server."""
    pool = overloaded_pool
    path = e2e_logs.dir / "endpoints.yaml"

    def write(hostports: Sequence[str]) -> None:
        write_endpoints(path, by_port(hostports), objectives=objectives(batch=-1, interactive=10))

    write(pool.idle.hostports)
    p = picker(endpoints_file=str(path))
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"

    def ask(objective: str | None, k: int) -> tuple[int, dict[str, str], bytes]:
        headers = {OBJECTIVE_HEADER: objective} if objective else {}
        return post(url, {"model": "m1", "prompt": f"shed check {objective} {k}", "max_tokens": 2}, headers,
                    timeout=10)

    # Not saturated: a sheddable request is served. (Polled: the detector counts metrics older
    # than 200 ms as saturated, and a starved picker can briefly see both idle servers so.)
    wait_for_view(p, lambda v: len(v) == 2 and all(fresh(e) for e in v.values()), "fresh metrics of the idle pool")
    wait_until(lambda: ask("batch", 0)[0] == 200, 10, "a sheddable request to be served", interval=0.1)

    write(pool.hostports)
    wait_for_view(p, lambda v: len(v) == 3 and hot_queue_seen(pool)(v), "the hot server to join the pool")
    kinds = ["batch", "interactive", None] * 4  # interleaved, concurrently
    idle0, hot0 = pool.idle.served(), counters(pool.hot, "sim_requests_total")
    results = run_concurrently(lambda k: ask(kinds[k], k), len(kinds), concurrency=6)
    for kind, (status, headers, body) in zip(kinds, results, strict=True):
        if kind == "batch":
            assert status == 429, (status, body)
            assert body.startswith(b"inference error: ResourceExhausted - "), body
            assert headers["content-type"] == "text/plain"
        else:
            assert status == 200, (kind, status, body)
    admitted = sum(1 for k in kinds if k != "batch")
    assert sum(delta(pool.idle.served(), idle0)) == admitted  # shed requests never reached a server
    assert delta(counters(pool.hot, "sim_requests_total"), hot0) == [0]
    assert metric_sum(p.metrics(), "inference_objective_request_error_total",
                      error_code="ResourceExhausted") == len(kinds) - admitted


# --------------------------------------------------------------------------- 5. a server dies
STALENESS = 1.0  # --metrics-staleness-threshold given to the picker (seconds)


# Static endpoints have no readiness probe: the director drops an endpoint whose scrapes have
# failed for longer than --metrics-staleness-threshold (Director.reachable). Without that, the
# default scorers read the dead server's last snapshot (queue 0, kv 0) and it keeps winning ties.
def test_dead_server_is_not_picked_once_its_metrics_are_stale(sim_servers, picker, envoy):
    sims = sim_servers(3, time_scale=20)
    p = picker(endpoints=sims.hostports, extra_flags=[f"--metrics-staleness-threshold={STALENESS}s"])
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"

    def one(k: int) -> tuple[int, dict[str, str], bytes]:
        return post(url, {"model": "m1", "prompt": f"dead server check {k}", "max_tokens": 2}, timeout=10)

    before = sims.served()
    results = run_concurrently(one, 15, concurrency=3)
    assert [r[0] for r in results] == [200] * 15
    assert sum(1 for d in delta(sims.served(), before) if d) >= 2  # traffic was spread

    dead = sims.hostports[2]
    assert post(f"http://{dead}/sim/die", {})[0] == 200
    wait_until(lambda: not port_open(sims.ports[2]), 10, "the dead server's port to close")
    wait_for_view(p, lambda v: not v[dead].metrics.ok and v[dead].metrics.age_seconds > STALENESS,
                  "the picker to see the dead server's metrics go stale")

    alive = [0, 1]  # sims.served() would scrape the dead one
    before = [metric_sum(sims.metrics(i), "vllm:request_success_total") for i in alive]
    n = 30
    results = run_concurrently(lambda k: one(100 + k), n, concurrency=5)
    failed = [(r[0], r[2][:120]) for r in results if r[0] != 200]
    assert not failed, f"{len(failed)}/{n} requests failed after the dead server went stale: {failed[:3]}"
    after = [metric_sum(sims.metrics(i), "vllm:request_success_total") for i in alive]
    assert sum(delta(after, before)) == n
