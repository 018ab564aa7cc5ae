"""Request-size limits through the real Envoy 1.40 binary (issue 8 finding 8): a body over
--max-request-body-bytes is answered 413 by the picker (an ImmediateResponse) in both
body modes and on both ext_proc transports; nothing stays running, the next request is served."""

from __future__ import annotations

import pytest

from devstack.launch import wait_until
from devstack.localstack import metric_sum
from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 100_000


@pytest.mark.parametrize("transport", ["grpcio", "native"])
@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_request_body_over_the_limit_gets_413(module_sim_servers, picker, envoy, transport, mode):
    p = picker(endpoints=module_sim_servers.hostports,
               extra_flags=[f"--ext-proc-transport={transport}", "--api-port=0", f"--max-request-body-bytes={LIMIT}"])
    env = envoy(mode, p)
    url = f"{env.url}/v1/completions"
    status, headers, body = post(url, {"model": "m1", "prompt": "x" * (LIMIT + 1000), "max_tokens": 2})
    assert status == 413, body[:300]
    assert body.startswith(b"inference error: PayloadTooLarge - request body over 100000 bytes")
    assert headers["content-type"] == "text/plain"
    status, _, body = post(url, {"model": "m1", "prompt": "y" * (LIMIT - 1000), "max_tokens": 2})
    assert status == 200, body[:300]
    wait_until(lambda: metric_sum(p.metrics(), "inference_objective_running_requests") == 0, 20,
               "no request left running")
    assert metric_sum(p.metrics(), "inference_objective_request_error_total") == 1
