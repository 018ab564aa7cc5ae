"""--drain-timeout through the real Envoy: a SIGTERM'd `epp serve` reports NOT_SERVING at
once (liveness excepted), finishes the ext_proc stream of a request in flight, still routes
a request that arrives during the window, and exits when the window is over."""

from __future__ import annotations

import signal
import time

import openai
import pytest
from grpc_health.v1 import health_pb2

from devstack.launch import wait_until
from tests.e2e.conftest import health

pytestmark = pytest.mark.e2e

DRAIN = 4.0


def test_sigterm_drains_through_envoy(sim_servers, picker, envoy):
    sims = sim_servers(1, model="m1", time_scale=1, step_overhead=0.05)  # ~50 ms per token
    p = picker(endpoints=sims.hostports, extra_flags=[f"--drain-timeout={DRAIN:g}s"])
    env = envoy("full-duplex", p)
    c = openai.OpenAI(base_url=f"{env.url}/v1", api_key="unused", max_retries=0, timeout=30)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: health(p.health_port, "readiness") == serving, 10, "readiness")

    chunks = iter(c.completions.create(model="m1", prompt="drain me", max_tokens=40, stream=True))
    first = next(chunks)  # the request is in flight: its ext_proc stream is open (full duplex)
    sent = time.monotonic()
    p.process.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: health(p.health_port, "readiness") == not_serving, 3.0, "NOT_SERVING at once")
    assert health(p.health_port, "") == not_serving
    assert health(p.health_port, "liveness") == serving  # not restarted mid-drain

    rest = list(chunks)  # the in-flight stream finishes through the draining picker
    assert first.choices[0].text and rest and rest[-1].choices[0].finish_reason == "length"
    late = c.completions.create(model="m1", prompt="late", max_tokens=2)  # a new stream during the window
    assert late.model == "m1" and late.choices[0].text
    assert p.process.proc.poll() is None and time.monotonic() - sent < DRAIN  # still in the window

    assert p.process.proc.wait(DRAIN + 15) == 0
    assert time.monotonic() - sent >= DRAIN - 0.5  # served the whole window, as the reference does
    assert "draining" in p.log() and "drain window over" in p.log()
