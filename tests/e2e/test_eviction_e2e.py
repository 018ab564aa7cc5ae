"""In-flight eviction end to end: the real Envoy 1.40 in front of `epp serve` (both ext_proc
transports) with `flowControl.enableEviction: true`, and a real `epp sim` in wall time. The
concurrency-detector with maxConcurrency 1 makes one running request saturate the pool, so
a critical request (priority 10) arriving behind a sheddable one (priority -1) in flight
is held at the head of the line and the picker evicts the sheddable request:

- a non-streamed sheddable request: its client gets the reference's answer, 429 with body
  "request evicted by flow control" and x-llm-d-request-dropped-reason: evicted (Envoy
  turns the picker's ImmediateResponse into the local reply while it waits for the
  response headers);
- a streamed (SSE) sheddable request whose response headers already went out: Envoy
  cannot change the status any more and resets the downstream stream, so the client's
  body ends early without the final `data: [DONE]`;
- either way Envoy resets the upstream request: the simulator's running count drops, the
  critical request is served, the picker's running-requests gauge and the revocation
  counters say one revocation, confirmed, nothing left running.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.launch import wait_until
from epp.errors import DROPPED_REASON_HEADER
from tests.e2e.api import endpoint, objectives, write_endpoints
from tests.e2e.conftest import metric_sum, post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OBJECTIVE_HEADER = "x-gateway-inference-objective"
CONFIG = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
"""


def endpoints_file(directory: Path, hostports: list[str]) -> str:
    return write_endpoints(directory / "endpoints.json", [endpoint(f"sim-{i}", hp) for i, hp in enumerate(hostports)],
                           objectives=objectives(batch=-1, critical=10))


def stream_until_closed(host: str, port: int, body: dict, headers: dict[str, str],
                        started: threading.Event) -> tuple[int, bytes, str]:
    """POST a streamed request and read until the connection ends: (status, what arrived,
    how it ended: "complete" or the error that cut it). `started` is set once the first
    body bytes arrived."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        got = b""
        try:
            while chunk := resp.read1(65536):
                got += chunk
                started.set()
        except (http.client.IncompleteRead, ConnectionError) as e:
            return resp.status, got, type(e).__name__
        return resp.status, got, "complete"
    finally:
        conn.close()


def running(text: str) -> float:
    return metric_sum(text, "vllm:num_requests_running")


@pytest.mark.parametrize("mode, transport, streamed", [
    ("full-duplex", "native", False), ("full-duplex", "native", True),
    ("full-duplex", "grpcio", False), ("full-duplex", "grpcio", True),
    ("buffered", "grpcio", True),  # BUFFERED request body, STREAMED response body
])
def test_a_sheddable_request_in_flight_is_evicted_for_a_critical_one(sim_servers, picker, envoy, e2e_logs,
                                                                      mode, transport, streamed):
    sims = sim_servers(1, time_scale=1.0)
    p = picker(endpoints_file=endpoints_file(e2e_logs.dir, sims.hostports), config_text=CONFIG,
               extra_flags=[f"--ext-proc-transport={transport}"])
    env = envoy(mode, p)
    url = f"{env.url}/v1/completions"
    host, port = env.url.removeprefix("http://").rsplit(":", 1)
    shed_body = {"model": "m1", "prompt": "a long batch job", "max_tokens": 2000, "stream": streamed}
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        if streamed:
            shed = pool.submit(stream_until_closed, host, int(port), shed_body, {OBJECTIVE_HEADER: "batch"}, started)
        else:
            shed = pool.submit(post, url, shed_body, {OBJECTIVE_HEADER: "batch"}, 30)
        wait_until(lambda: running(sims.metrics(0)) == 1, 10, "the sheddable request to run on the simulator")
        if streamed:  # its response headers and first tokens reached the client
            assert started.wait(10)
        t0 = time.monotonic()
        status, _, body = post(url, {"model": "m1", "prompt": "urgent", "max_tokens": 2},
                               {OBJECTIVE_HEADER: "critical"}, 30)
        served_in = time.monotonic() - t0
        assert status == 200, body  # served once the sheddable request's slot was reclaimed
        assert served_in < 5.0  # not after the 2000-token job finished (about 20 s at time scale 1)
        if streamed:
            shed_status, got, ended = shed.result(timeout=30)
            assert shed_status == 200  # the headers had gone out before the eviction
            assert ended != "complete" or b"data: [DONE]" not in got, got[-200:]
            assert b"data: [DONE]" not in got
        else:
            shed_status, headers, shed_text = shed.result(timeout=30)
            assert shed_status == 429, shed_text
            assert headers.get(DROPPED_REASON_HEADER) == "evicted"
            assert shed_text == b"request evicted by flow control"
    # Envoy took the picker's ImmediateResponse (in the response phase too) and reset the upstream request
    stats = env.stats()
    assert stats["http.inference.ext_proc.immediate_responses_sent"] == 1
    assert stats["cluster.pool.upstream_cx_destroy_local_with_active_rq"] == 1
    # the simulator saw the upstream request go away and freed its slot; nothing leaked in the picker
    wait_until(lambda: running(sims.metrics(0)) == 0, 10, "the simulator to free the evicted request's slot")
    page = p.metrics()
    assert metric_sum(page, "llm_d_epp_flow_control_revocations_issued_total", priority="10") == 1
    wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_flow_control_revocations_total",
                                  outcome="confirmed") == 1, 5, "the revocation to be confirmed")
    wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_request_running") == 0, 5,
               "the picker's running-requests gauge to return to 0")
    assert metric_sum(p.metrics(), "llm_d_epp_flow_control_queue_size") == 0
    status, _, body = post(url, {"model": "m1", "prompt": "after", "max_tokens": 2}, {OBJECTIVE_HEADER: "batch"})
    assert status == 200, body  # the picker keeps serving, sheddable requests too
