"""P/D disaggregation end to end: the real Envoy in front of `epp serve` with the llm-d P/D
guide's configuration (tests/fixtures/reference/configs/llm-d-pd-disaggregation.yaml, its
always-disagg decider swapped for prefix-based-pd-decider so short prompts stay on decode),
one `epp sim --role prefill` server and two `--role decode` servers that act as the
reference's routing sidecar. Every stage is counted by the servers themselves
(sim_requests_total{role}); synchronisation by polling, never sleeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.launch import wait_until
from tests.e2e.api import endpoint, write_endpoints
from tests.e2e.conftest import metric_sum, post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUIDE = Path(__file__).parent.parent / "fixtures" / "reference" / "configs" / "llm-d-pd-disaggregation.yaml"
NON_CACHED = 256  # tokens: prompts of fewer stay on one decode server
ROLE = "llm-d.ai/role"


def config() -> str:
    text = GUIDE.read_text()
    out = text.replace("- type: always-disagg-pd-decider\n",
                       f"- type: prefix-based-pd-decider\n  parameters: {{nonCachedTokens: {NON_CACHED}}}\n")
    out = out.replace("prefill: always-disagg-pd-decider", "prefill: prefix-based-pd-decider")
    assert out != text and "always-disagg" not in out
    return out


def endpoints_file(directory: Path, prefill, decode) -> str:
    """An endpoints file: the prefill server p0 and decode servers d0, d1, ... labelled by role."""
    return write_endpoints(directory / "endpoints.yaml", [endpoint("p0", prefill.ports[0], {ROLE: "prefill"})] + [
        endpoint(f"d{i}", port, {ROLE: "decode"}) for i, port in enumerate(decode.ports)])


def requests_by_role(sims, i: int) -> dict[str, float]:
    text = sims.metrics(i)
    return {role: metric_sum(text, "sim_requests_total", role=role) for role in ("prefill", "decode", "both")}


def stream(url: str, prompt: str, max_tokens: int) -> tuple[int, str, int]:
    """(status, the streamed text, the number of content chunks)."""
    status, _, body = post(url, {"model": "m1", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                                 "stream_options": {"include_usage": True}}, timeout=60)
    text, chunks = "", 0
    lines = [ln[6:] for ln in body.decode().splitlines() if ln.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", body[-200:]
    for line in lines[:-1]:
        for choice in json.loads(line).get("choices") or []:
            if choice.get("text"):
                text += choice["text"]
                chunks += 1
    return status, text, chunks


def test_pd_through_envoy_long_prompt_disaggregated_short_stays_prefill_loss_degrades(sim_servers, picker, envoy,
                                                                                       tmp_path):
    prefill = sim_servers(1, role="prefill")
    decode = sim_servers(2, roles="decode,decode")
    p = picker(endpoints_file=endpoints_file(tmp_path, prefill, decode), config_text=config())
    url = f"{envoy('full-duplex', p).url}/v1/completions"

    def totals():
        return requests_by_role(prefill, 0), [requests_by_role(decode, i) for i in range(2)]

    # a long prompt: prefilled on the prefill server, decoded on a decode server, streamed back whole
    p0, d0 = totals()
    status, text, chunks = stream(url, "long prompt " * 800, 24)  # ~2400 tokens, nothing cached
    assert status == 200 and chunks == 24 and text
    wait_until(lambda: totals()[0]["prefill"] == p0["prefill"] + 1, 20, "the prefill server counted the prefill")
    _, d1 = totals()
    assert sum(d["decode"] for d in d1) - sum(d["decode"] for d in d0) == 1  # KV pulled, decoded there
    assert sum(d["both"] for d in d1) == sum(d["both"] for d in d0)  # nothing prefilled locally

    # a short prompt stays on one decode server: the prefill server sees nothing
    p1, d1 = totals()
    status, text, chunks = stream(url, "short prompt", 8)
    assert status == 200 and chunks == 8
    wait_until(lambda: sum(d["both"] for d in totals()[1]) == sum(d["both"] for d in d1) + 1, 20,
               "a decode server served the short prompt itself")
    assert totals()[0] == p1

    # the prefill server dies: long prompts are served aggregated on decode, none fails
    prefill.process.kill()

    def served_locally() -> float:
        return sum(requests_by_role(decode, i)["both"] for i in range(2))

    before = served_locally()
    statuses = [stream(url, f"another long prompt {k} " * 500, 4)[0] for k in range(3)]
    assert statuses == [200] * 3
    wait_until(lambda: served_locally() == before + 3, 20, "the decode servers prefilled locally")
    fallbacks = sum(metric_sum(decode.metrics(i), "sim_pd_local_fallbacks_total") for i in range(2))
    assert fallbacks >= 1  # the sidecar tried the dead prefiller first, then fell back


def test_mostly_cached_long_prompt_stays_on_its_decode_server(sim_servers, picker, envoy, tmp_path):
    # the decode profile scores the prefix too, so a follow-up lands where its prefix is cached;
    # the decider then finds fewer than nonCachedTokens uncached tokens there: no prefill leg
    prefill, decode = sim_servers(1, role="prefill"), sim_servers(2, roles="decode,decode")
    text = config().replace("- type: token-load-scorer\n", "- type: token-load-scorer\n- type: prefix-cache-scorer\n")
    text = text.replace("  - pluginRef: decode-filter\n", "  - pluginRef: decode-filter\n  - pluginRef: prefix-cache-scorer\n"
                        "    weight: 5\n")
    assert text.count("prefix-cache-scorer") == 2
    p = picker(endpoints_file=endpoints_file(tmp_path, prefill, decode), config_text=text)
    url = f"{envoy('full-duplex', p).url}/v1/completions"
    conversation = "a long shared conversation " * 400  # ~2700 tokens
    assert stream(url, conversation, 4)[0] == 200
    wait_until(lambda: requests_by_role(prefill, 0)["prefill"] == 1, 20, "the first turn prefilled apart")
    first = [requests_by_role(decode, i)["decode"] for i in range(2)]
    assert sorted(first) == [0, 1]
    home = first.index(1)
    assert stream(url, conversation + "and a short follow-up", 4)[0] == 200  # ~6 new tokens uncached
    wait_until(lambda: requests_by_role(decode, home)["both"] == 1, 20, "the follow-up served on its decode server")
    assert requests_by_role(prefill, 0)["prefill"] == 1  # no second prefill leg


def test_pd_guide_config_unchanged_disaggregates_every_request(sim_servers, picker, envoy, tmp_path):
    # the guide's always-disagg-pd-decider: even a short prompt is prefilled apart
    prefill, decode = sim_servers(1, role="prefill"), sim_servers(1, role="decode")
    p = picker(endpoints_file=endpoints_file(tmp_path, prefill, decode), config_text=GUIDE.read_text())
    url = f"{envoy('full-duplex', p).url}/v1/completions"
    status, _, body = post(url, {"model": "m1", "prompt": "short prompt", "max_tokens": 5}, timeout=60)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 5
    wait_until(lambda: requests_by_role(prefill, 0)["prefill"] == 1 and requests_by_role(decode, 0)["decode"] == 1,
               20, "prefill and decode servers each counted the request")
    assert requests_by_role(decode, 0)["both"] == 0
