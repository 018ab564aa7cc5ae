"""E/P/D end to end: the real Envoy in front of `epp serve` with disagg-profile-handler's
encode and prefill stages (always-disagg-multimodal-decider, always-disagg-pd-decider, the
reference README's E/P/D shape), an `epp sim --role encode` server, a prefill and a decode
server. A chat request with images is encoded on the encode server (one pass per distinct
image, counted there), prefilled apart and decoded; a text-only chat request skips the encoder."""

from __future__ import annotations

import json

import pytest

from devstack.launch import wait_until
from tests.e2e.api import endpoint, write_endpoints
from tests.e2e.conftest import metric_sum, post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROLE = "llm-d.ai/role"
CONFIG = """
plugins:
- type: always-disagg-multimodal-decider
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider, encode: always-disagg-multimodal-decider}
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: queue-scorer
schedulingProfiles:
- {name: encode, plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]}
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]}
"""


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_multimodal_request_is_encoded_then_prefilled_and_decoded(sim_servers, picker, envoy, tmp_path):
    encode, prefill, decode = (sim_servers(1, role=r) for r in ("encode", "prefill", "decode"))
    endpoints = write_endpoints(tmp_path / "endpoints.yaml", [
        endpoint(role, s.ports[0], {ROLE: role}) for role, s in (("encode", encode), ("prefill", prefill), ("decode", decode))])
    p = picker(endpoints_file=endpoints, config_text=CONFIG)
    url = f"{envoy('full-duplex', p).url}/v1/chat/completions"

    def counts() -> tuple[float, float, float, float]:
        return (metric_sum(encode.metrics(0), "sim_requests_total", role="encode"),
                metric_sum(prefill.metrics(0), "sim_requests_total", role="prefill"),
                metric_sum(decode.metrics(0), "sim_requests_total", role="decode"),
                metric_sum(decode.metrics(0), "sim_requests_total", role="both"))

    content = [{"type": "text", "text": "what differs between these?"}, image("http://img/a.png"),
               image("http://img/b.png"), image("http://img/a.png")]  # a.png twice: encoded once
    status, _, body = post(url, {"model": "m1", "max_tokens": 6, "messages": [{"role": "user", "content": content}]},
                           timeout=60)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 6, body
    wait_until(lambda: counts() == (2, 1, 1, 0), 20, "two encoder passes, one prefill, one decode")

    status, _, body = post(url, {"model": "m1", "max_tokens": 3, "messages": [{"role": "user", "content": "text"}]},
                           timeout=60)
    assert status == 200, body
    wait_until(lambda: counts() == (2, 2, 2, 0), 20, "a text-only request prefilled and decoded, not encoded")

    # the decode side's sidecar: an encoder that cannot be reached fails the request (502), as the reference's
    status, _, body = post(decode.url(0) + "/v1/chat/completions",
                           {"model": "m1", "max_tokens": 3, "messages": [{"role": "user", "content": [image("x")]}]},
                           headers={"x-encoder-hosts-ports": "127.0.0.1:1"})
    assert status == 502 and b"encoder request failed for item 0" in body, (status, body)
