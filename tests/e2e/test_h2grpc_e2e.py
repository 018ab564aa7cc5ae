"""`epp serve --ext-proc-transport=native` (epp.handlers.h2.server) behind the real Envoy 1.40 binary
with `epp sim` servers: both body modes, TLS, large bodies, concurrency, client
disconnects (no leak) and a picker restart without restarting Envoy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from devstack.launch import free_port, wait_until
from devstack.localstack import metric_sum
from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNNING = "inference_objective_running_requests"


def round_trip(env) -> None:
    """Streamed and non-streamed completions, parsed strictly by the openai client."""
    c = openai.OpenAI(base_url=f"{env.url}/v1", api_key="unused", max_retries=0, timeout=30)
    r = c.completions.create(model="m1", prompt="The quick brown fox", max_tokens=6)
    assert r.model == "m1" and r.choices[0].text and r.usage.completion_tokens == 6
    chunks = list(c.completions.create(model="m1", prompt="Once upon a time", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == 6
    chat = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4


def large_body(env) -> None:
    """A >200 KB body: many DATA frames and gRPC messages each way."""
    prompt = "".join(chr(97 + i % 26) for i in range(250_000))
    status, _, body = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": prompt, "max_tokens": 2})
    assert status == 200, body[:300]
    usage = json.loads(body)["usage"]
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] > 40_000  # the whole body arrived


def disconnect_mid_response_releases(env, p) -> None:
    """The client goes away while the response streams: Envoy resets the ext_proc stream
    and the picker's running-request count goes back to zero."""
    body = json.dumps({"model": "m1", "prompt": "tell me a long story", "max_tokens": 4000, "stream": True})
    s = socket.create_connection(("127.0.0.1", env.port), timeout=30)
    try:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n{body}").encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        wait_until(lambda: metric_sum(p.metrics(), RUNNING) == 1, 20, "the request to be running")
    finally:
        s.close()
    wait_until(lambda: metric_sum(p.metrics(), RUNNING) == 0, 20, "the cancelled request to be released")


def test_native_full_duplex_plaintext(sim_servers, picker, envoy):
    sims = sim_servers(3, time_scale=20, max_model_len=100_000)
    api_port = free_port()
    p = picker(endpoints=sims.hostports, extra_flags=["--ext-proc-transport=native", f"--api-port={api_port}"])
    assert f"ext_proc=native api={api_port}" in p.log()
    env = envoy("full-duplex", p)
    before = sum(sims.served())
    round_trip(env)
    large_body(env)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: post(f"{env.url}/v1/completions",
                                               {"model": "m1", "prompt": f"request {i}", "max_tokens": 3}),
                                range(50)))
    assert [r[0] for r in results] == [200] * 50
    assert sum(sims.served()) - before == 3 + 1 + 50
    disconnect_mid_response_releases(env, p)

    # the project API moved to --api-port (grpc.aio), ext_proc kept --grpc-port
    out = subprocess.run([sys.executable, "-m", "epp.cli", "endpoints", "--addr", f"127.0.0.1:{api_port}",
                          "--insecure", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(str(port) in out.stdout for port in sims.ports), out.stdout

    p.restart()  # same ports; Envoy is not restarted
    status, _, body = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "after restart", "max_tokens": 2})
    assert status == 200, body[:300]
    assert metric_sum(p.metrics(), "inference_objective_request_total") == 1  # served by the new picker


def test_native_buffered_tls(sim_servers, picker, envoy):
    sims = sim_servers(2, time_scale=20, max_model_len=100_000)
    p = picker(endpoints=sims.hostports, tls=True, extra_flags=["--ext-proc-transport=native", "--api-port=0"])
    assert "ext_proc=native api=off" in p.log()
    env = envoy("buffered", p)
    before = sum(sims.served())
    round_trip(env)
    large_body(env)
    assert sum(sims.served()) - before == 4
    disconnect_mid_response_releases(env, p)
    bad = post(f"{env.url}/v1/completions", {"prompt": "no model"})
    assert bad[0] == 400 and bad[2].startswith(b"inference error: BadRequest - ")
    # SIGINT with Envoy's connection open: GOAWAY handshake, then a clean exit
    p.process.proc.send_signal(2)
    assert p.process.proc.wait(20) == 0
