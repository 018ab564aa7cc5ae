"""Precise prefix-cache routing through the real Envoy, the real picker and `epp sim`
servers publishing their KV-cache events over ZMQ as vLLM does.

The picker runs the reference's precise-prefix-cache guide config unchanged
(tests/fixtures/reference/configs/llm-d-precise-prefix-cache.yaml, blockSize 64, no
kvEventsConfig: the defaults subscribe to tcp://<endpoint address>:5557). Each simulator
therefore gets its own loopback address (127.x.y.1, 127.x.y.2) and publishes on its port
5557 there, with vLLM's default 16-token blocks (four make one of the picker's 64-token
blocks). Prompts are token ids, which the producer keys exactly as the servers do.

What is checked, by polling the picker's Explain dry run (never by sleeping):
- a prefix the picker routed is scored as cached on that server only once its BlockStored
  arrives; after POST /reset_prefix_cache the AllBlocksCleared event drops it and requests
  with that prefix go to the server that still holds it;
- a prefix evicted under memory pressure (BlockRemoved) is no longer scored as cached;
- with the servers' event streams closed, scoring falls back to the approximate guess (the
  server a prefix was routed to scores it as cached though no event will ever say so), and
  every request still succeeds.
"""

from __future__ import annotations

import json
import random
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from devstack.launch import Process, free_port, http_ok, on_fresh_ports, wait_until
from devstack.localstack import EPP
from epp.apicli import format_endpoints, format_explain
from tests.e2e import api
from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUIDE = Path(__file__).parents[1] / "fixtures" / "reference" / "configs" / "llm-d-precise-prefix-cache.yaml"
BLOCK = 64  # the guide's tokenProcessorConfig.blockSize
SERVER_BLOCK = 16  # vLLM's default: four server blocks make one of the picker's
KV_TOKENS = 24 * 64  # small enough to evict under a few prompts
SOCKET_PORT = 5557  # kvEventsConfig.podDiscoveryConfig.socketPort's default


def _loopback_ips(n: int = 2) -> list[str]:
    """n loopback addresses whose port 5557 is free (other test runs may hold some). The
    port is outside the kernel's ephemeral range, so no bind(0) or outgoing connection
    anywhere on the machine takes it between this check and the bind (a free_port() can)."""
    rng = random.Random()
    for _ in range(50):
        base = f"127.{rng.randrange(16, 250)}.{rng.randrange(1, 250)}"
        ips = [f"{base}.{i}" for i in range(1, n + 1)]
        try:
            for ip in ips:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZMQ binds
                    s.bind((ip, SOCKET_PORT))
        except OSError:
            continue
        return ips
    raise RuntimeError(f"no {n} free loopback addresses with port {SOCKET_PORT}")


class Sim:
    def __init__(self, ip: str, log_dir: Path, *kv_args: str, block: int = SERVER_BLOCK) -> None:
        self.ip = ip
        kv = kv_args or ("--kv-events-endpoint", f"tcp://{ip}:{SOCKET_PORT}")

        def start() -> None:  # on a fresh port again if the one found free is taken before the bind
            self.port = free_port()
            self.hostport = f"{ip}:{self.port}"
            self.url = f"http://{self.hostport}"
            self.proc = Process([*EPP, "sim", "--host", ip, "--port", str(self.port), "--model", "m1", "--block-size",
                                 str(block), "--num-gpu-blocks", str(KV_TOKENS // block), "--time-scale", "20", *kv],
                                name=f"sim-{self.hostport}", log_path=log_dir / f"sim-{self.hostport}.log")
            wait_until(lambda: not self.proc.alive() or http_ok(self.url + "/health"), 30, f"simulator {self.hostport}")
            if not self.proc.alive():
                raise RuntimeError(f"simulator {self.hostport} exited: {self.proc.log_tail()}")

        on_fresh_ports(start)

    def post(self, path: str, body: dict | None = None) -> int:
        return post(self.url + path, body or {})[0]

    def requests(self) -> int:
        with urllib.request.urlopen(self.url + "/sim/info", timeout=5) as r:  # noqa: S310 - loopback
            return json.loads(r.read())["stats"]["num_requests_received"]


@pytest.fixture
def stack(e2e_logs, picker, envoy):
    sims: list[Sim] = []
    try:
        sims += [Sim(ip, e2e_logs.dir) for ip in _loopback_ips()]
        p = picker(endpoints=[s.hostport for s in sims], config_text=GUIDE.read_text(),
                   extra_flags=["--tracing=false"])
        env = envoy("full-duplex", p)
        yield sims, p, env
    finally:
        for s in sims:
            s.proc.stop()


def prompt(seed: int, blocks: int = 6) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(blocks * BLOCK)]


def body(ids: list[int]) -> dict:
    return {"model": "m1", "prompt": ids, "max_tokens": 1}


def prefix_scores(api_port: int, ids: list[int]) -> dict[str, float]:
    """hostport -> the prefix-cache-scorer's raw score for this prompt (Explain dry run)."""
    return api.prefix_scores(api_port, body(ids))


def send(env, ids: list[int]) -> None:
    status, _, raw = post(f"{env.url}/v1/completions", body(ids))
    assert status == 200, raw


def landed(sims: list[Sim], before: list[int]) -> Sim:
    after = [s.requests() for s in sims]
    moved = [s for s, b, a in zip(sims, before, after, strict=True) if a > b]
    assert len(moved) == 1, (before, after)
    return moved[0]


def route_and_see_stored(env, p, sims: list[Sim], ids: list[int]) -> tuple[Sim, Sim]:
    """Send the prompt through Envoy; (the server it landed on, the other) once the former's
    BlockStored made the prefix precise-cached there, and only there."""
    before = [s.requests() for s in sims]
    send(env, ids)
    x = landed(sims, before)
    y = next(s for s in sims if s is not x)
    # precise too: while x's stream has delivered nothing, x is scored from the approximate guess,
    # which holds the routed prefix at once
    wait_until(lambda: prefix_scores(p.api_port, ids) == {x.hostport: 1.0, y.hostport: 0.0}
               and stream_status(p.api_port, x.hostport) == "precise", 20,
               "the routed prefix scored as cached on its server, from its events")
    return x, y


def stream_status(api_port: int, hostport: str) -> str:
    """The endpoint's KV-event stream status, as `epp endpoints` shows it."""
    return next(dict(e.status).get("kv-events", "") for e in api.list_endpoints(api_port).endpoints
                if f"{e.address}:{e.port}" == hostport)


def test_reset_and_eviction_reach_the_picker_by_events(stack):
    sims, p, env = stack
    ids = prompt(1)
    x, y = route_and_see_stored(env, p, sims, ids)
    # Explain shows the matched blocks by medium; `epp endpoints` each stream's status and lag
    resp, endpoints = api.explain(p.api_port, body(ids))
    name = {f"{e.address}:{e.port}": e.name for e in endpoints.endpoints}
    assert [(m.producer, m.endpoint, m.matched_blocks, m.total_blocks, m.block_size_tokens, dict(m.blocks_by_medium))
            for m in resp.prefix_matches] == [("precise-prefix-cache-producer", name[x.hostport], 6, 6, BLOCK,
                                               {"gpu": 6})]
    assert f"prefix precise-prefix-cache-producer: {name[x.hostport]} holds 6/6 blocks of 64 tokens (gpu=6)" \
        in format_explain(resp)
    assert {e.status["kv-events"] for e in endpoints.endpoints} == {"precise", "waiting"}  # y: no batch yet
    assert float(next(e for e in endpoints.endpoints if e.name == name[x.hostport]).status["kv-events-lag"][:-1]) < 5
    assert "kv-events=precise kv-events-lag=" in format_endpoints(endpoints)
    metrics = p.metrics()  # per-endpoint stream metrics
    assert f'llm_d_epp_kv_cache_events_stream_precise{{pod_identifier="{name[x.hostport]}"}} 1.0' in metrics
    assert f'llm_d_epp_kv_cache_events_dropped_batches_total{{pod_identifier="{name[x.hostport]}"}} 0.0' in metrics
    assert f'llm_d_epp_kv_cache_events_lag_seconds{{pod_identifier="{name[x.hostport]}"}}' in metrics
    assert y.post("/v1/completions", body(ids)) == 200  # y caches it too (outside the picker)
    wait_until(lambda: prefix_scores(p.api_port, ids) == {x.hostport: 1.0, y.hostport: 1.0}, 20,
               "y's events seen")

    # reset x: the AllBlocksCleared event drops the prefix there as soon as it arrives
    assert x.post("/reset_prefix_cache") == 200
    wait_until(lambda: prefix_scores(p.api_port, ids)[x.hostport] == 0.0, 20, "x's reset seen")
    for _ in range(3):
        before = [s.requests() for s in sims]
        send(env, ids)
        assert landed(sims, before) is y  # the prefix goes where it is still cached

    # memory pressure on y: other prompts evict the prefix's blocks (BlockRemoved)
    for k in range(2, 6):
        assert y.post("/v1/completions", body(prompt(k))) == 200
    wait_until(lambda: prefix_scores(p.api_port, ids)[y.hostport] < 1.0, 20, "y's evictions seen")
    wait_until(lambda: prefix_scores(p.api_port, ids)[y.hostport] == 0.0, 20, "the whole prefix evicted on y")


def test_closed_event_streams_fall_back_to_the_approximate_guess(stack):
    sims, p, env = stack
    warm = prompt(7)
    send(env, warm)  # both streams deliver (some server stores it), so both are subscribed and precise
    for s in sims:
        assert s.post("/v1/completions", body(warm)) == 200
    wait_until(lambda: set(prefix_scores(p.api_port, warm).values()) == {1.0}, 20, "both streams precise")
    for s in sims:
        assert s.post("/sim/kv_events/close") == 200
    ids = prompt(8)
    # the picker notices the closed streams (disconnected): until then a routed prefix would
    # stay unscored; after, the approximate guess scores it on the server it was routed to
    before = [s.requests() for s in sims]
    send(env, ids)
    x = landed(sims, before)
    wait_until(lambda: prefix_scores(p.api_port, ids)[x.hostport] > 0.0, 20,
               "the routed prefix scored from the approximate guess")
    for k in range(9, 13):
        send(env, prompt(k))
    assert "Traceback" not in p.log(2000)  # nothing failed on the way


KIND = GUIDE.parent / "llm-d-router-sim-kvcache.yaml"
# the kind development environment's picker flags (deploy/components/inference-gateway/deployment.yaml),
# without the Kubernetes ones (--pool-name, --pool-namespace: static endpoints here)
KIND_FLAGS = ["--v", "4", "--zap-encoder", "json", "--allow-experimental-plugins=true",
              "--metrics-endpoint-auth=false", "--ha-enable-leader-election=false"]


def test_kind_config_global_socket_routes_by_topic(e2e_logs, picker, envoy):
    """The kind development config, its kvEventsConfig.zmqEndpoint localised: the picker
    binds tcp://127.a.b.1:5557 (a loopback address of its own) instead of tcp://0.0.0.0:5557
    (only that address changes, as the other tests swap a chart's cluster-bound flags), and the
    simulators publish into it (--kv-events-connect, as vLLM connects to a non-wildcard
    address), each message's topic kv@<ip:port>@<model> naming its endpoint among the pool's,
    so a prefix a server stores before the first request reaches the picker is scored."""
    # not 127.0.0.1:<free_port()>: until the picker binds it (after both servers start) any
    # process's bind(0) may be handed that port, and the picker then fails to start
    zmq_endpoint = f"tcp://{_loopback_ips(1)[0]}:{SOCKET_PORT}"
    text = KIND.read_text()
    assert text.count("zmqEndpoint: tcp://0.0.0.0:5557\n") == 1
    text = text.replace("zmqEndpoint: tcp://0.0.0.0:5557\n", f"zmqEndpoint: {zmq_endpoint}\n")
    sims: list[Sim] = []
    try:
        sims += [Sim("127.0.0.1", e2e_logs.dir, "--kv-events-endpoint", zmq_endpoint,
                     "--kv-events-connect") for _ in range(2)]
        p = picker(endpoints=[s.hostport for s in sims], config_text=text, extra_flags=KIND_FLAGS)
        env = envoy("full-duplex", p)
        # before any request reaches the picker, each server caches prompts of its own: the
        # topics name endpoints of the pool, so their events are indexed (none is dropped).
        # Both streams deliver before the first routed request: a server whose publisher is
        # still connecting would lose its events, and its score would stay the approximate guess.
        _, endpoints = api.explain(p.api_port, body(prompt(0, blocks=2)))
        names = {f"{e.address}:{e.port}": e.name for e in endpoints.endpoints}
        own: dict[str, list[int]] = {}
        for i, s in enumerate(sims):
            for k in range(100 * (i + 1), 100 * (i + 1) + 20):  # a new prefix each time: a batch may be
                assert s.post("/v1/completions", body(prompt(k, blocks=2))) == 200  # lost while connecting
                applied = f'messages_received_total{{pod_identifier="{names[s.hostport]}"}} '
                try:
                    wait_until(lambda a=applied: re.search(re.escape(a) + "[1-9]", p.metrics()), 1,
                               f"a KV-event batch of {s.hostport} applied")
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail(f"no KV-event batch of {s.hostport} reached the picker")
            own[s.hostport] = prompt(k, blocks=2)
        for s in sims:
            wait_until(lambda s=s: prefix_scores(p.api_port, own[s.hostport]) == {t.hostport: float(t is s) for t in sims},
                       20, f"a prefix {s.hostport} stored before the first request scored on it")
        ids = prompt(3, blocks=2)  # 8 blocks of the config's 16 tokens
        x, _ = route_and_see_stored(env, p, sims, ids)  # from the global socket's events
        assert x.post("/reset_prefix_cache") == 200
        wait_until(lambda: prefix_scores(p.api_port, ids)[x.hostport] == 0.0, 20, "x's reset seen")
    finally:
        for s in sims:
            s.proc.stop()
