"""The optimized-baseline guide's plugin set (tests/fixtures/reference/configs/
llm-d-optimized-baseline.yaml: prefix-cache-affinity-filter + token-load-scorer, fed by
inflight-load-producer and approx-prefix-cache-producer) through the real Envoy in front of
`epp serve` and real `epp sim` servers: concurrent long requests with no shared prefix are
spread by the tokens the in-flight load producer counts. That profile has no metrics-based
scorer, so without the producer every endpoint would score alike and the landing would be
random. Synchronisation is by polling the picker's own view (ListEndpoints), never by sleeping."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from devstack.launch import wait_until
from tests.e2e.conftest import post
from tests.e2e.test_scenarios import in_flight

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIXTURE = Path(__file__).parents[1] / "fixtures" / "reference" / "configs" / "llm-d-optimized-baseline.yaml"
SERVERS, PER_SERVER = 3, 3
MAX_TOKENS = 600  # ~3.6 s of decoding at the simulator's 6 ms per step: all stay in flight


def test_optimized_baseline_spreads_concurrent_long_requests_by_in_flight_tokens(sim_servers, picker, envoy):
    sims = sim_servers(SERVERS, time_scale=1.0)
    p = picker(endpoints=sims.hostports, config_text=FIXTURE.read_text())
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    rng = random.Random(7)
    results: list[int] = []
    threads = []
    for k in range(SERVERS * PER_SERVER):
        # distinct long prompts (~1000 tokens), nothing shared: the affinity filter keeps every endpoint
        prompt = " ".join(f"{rng.random():.12f}" for _ in range(280))
        body = {"model": "m1", "prompt": prompt, "max_tokens": MAX_TOKENS}
        t = threading.Thread(target=lambda b=body: results.append(post(url, b, timeout=60)[0]))
        t.start()
        threads.append(t)
        # the next one is routed only once this one is counted, so each pick sees the earlier ones
        wait_until(lambda n=k + 1: sum(in_flight(p).values()) == n, 20, f"request {k + 1} in flight",
                   interval=0.02)
    landing = in_flight(p)
    for t in threads:
        t.join(60)
    assert results == [200] * (SERVERS * PER_SERVER)
    # least in-flight tokens first: exactly PER_SERVER each (random: 3-3-3 in 8.5% of runs)
    assert sorted(landing.values()) == [PER_SERVER] * SERVERS, landing
    wait_until(lambda: sum(in_flight(p).values()) == 0, 20, "nothing in flight", interval=0.05)
