"""token-producer's real tokenizers through the real Envoy in front of `epp serve`, with an
`epp sim --tokenizer` server tokenizing prompts with the same files (tests/fixtures/tokenizer):
the vllm backend renders on the simulator's /v1/chat/completions/render, the in-process
backend tokenizes in the picker; either way the ids the picker publishes are as many as the
simulator's own prompt count (and not the 4-bytes-per-token estimate), read from the picker's
/metrics (epp_token_producer_*) after each request. Anthropic /v1/messages likewise, with each
vllm.messagesRenderMode (native on /v1/messages/render, legacy converted to chat, auto probing
at start) and in process, against the simulator's usage.input_tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tokenizer"
CONFIG = """\
plugins:
- type: token-producer
  parameters: PARAMS
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""
SYSTEM = "You route inference requests. Keep answers short and name the endpoint you chose. " * 6


def producer_counts(metrics_text: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(r'^epp_token_producer_(requests|published_tokens)\{([^}]*)\} (\S+)$', metrics_text, re.M):
        outcome = re.search(r'outcome="([^"]+)"', m.group(2))
        out[outcome.group(1) if outcome else m.group(1)] = float(m.group(3))
    return out


def chat(url: str, user: str, **extra) -> dict:
    body = {"model": "m1", "max_tokens": 2, "messages": [{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": user}], **extra}
    status, _, data = post(f"{url}/v1/chat/completions", body)
    assert status == 200, data
    return json.loads(data)


@pytest.mark.parametrize("backend", ["vllm", "inProcess"])
def test_picker_tokenizes_as_the_simulator_does(backend, sim_servers, picker, envoy):
    sims = sim_servers(1, time_scale=1.0, tokenizer=str(FIXTURE))
    params = {"modelName": "m1", "vllm": {"url": sims.url(0), "timeout": "5s"}} if backend == "vllm" \
        else {"inProcess": {"path": str(FIXTURE)}}
    p = picker(endpoints=sims.hostports, config_text=CONFIG.replace("PARAMS", json.dumps(params)))
    env = envoy("full-duplex", p)
    first = chat(env.url, "Which endpoint has the warmest cache?")
    n = first["usage"]["prompt_tokens"]
    counts = producer_counts(p.metrics())
    real = "rendered" if backend == "vllm" else "tokenized"
    assert counts[real] == 1 and counts["estimated"] == 0 and counts["published_tokens"] == n
    estimate = -(-len((SYSTEM + "Which endpoint has the warmest cache?").encode()) // 4)
    assert n != estimate  # the simulator's count is the fixture tokenizer's, not the estimate
    # same conversation, other sampling fields: the vllm backend answers from its render cache
    again = chat(env.url, "Which endpoint has the warmest cache?", temperature=0.3)
    counts = producer_counts(p.metrics())
    assert again["usage"]["prompt_tokens"] == n and counts["published_tokens"] == 2 * n
    if backend == "vllm":
        assert counts["rendered"] == 1 and counts["render_cached"] == 1
    else:
        assert counts["tokenized"] == 2


def test_a_render_service_that_is_down_falls_back_to_the_estimate(sim_servers, picker, envoy):
    sims = sim_servers(1, time_scale=1.0, tokenizer=str(FIXTURE))
    params = {"modelName": "m1", "vllm": {"url": "http://127.0.0.1:9", "timeout": "1s"}}  # nothing listens
    p = picker(endpoints=sims.hostports, config_text=CONFIG.replace("PARAMS", json.dumps(params)))
    env = envoy("full-duplex", p)
    chat(env.url, "Still routed?")
    counts = producer_counts(p.metrics())
    assert counts["fallback_error"] == 1 and counts["estimated"] == 1 and counts["published_tokens"] == 0


@pytest.mark.parametrize("backend", ["native", "legacy", "auto", "inProcess"])
def test_anthropic_messages_are_tokenized_as_the_simulator_does(backend, sim_servers, picker, envoy):
    sims = sim_servers(1, time_scale=1.0, tokenizer=str(FIXTURE))
    params = {"inProcess": {"path": str(FIXTURE)}} if backend == "inProcess" else \
        {"modelName": "m1", "vllm": {"url": sims.url(0), "timeout": "5s", "messagesRenderMode": backend}}
    p = picker(endpoints=sims.hostports, config_text=CONFIG.replace("PARAMS", json.dumps(params)))
    env = envoy("full-duplex", p)
    question = "Which endpoint has the warmest cache?"
    body = {"model": "m1", "max_tokens": 2, "system": [{"type": "text", "text": SYSTEM}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]}
    status, _, data = post(f"{env.url}/v1/messages", body)
    assert status == 200, data
    n = json.loads(data)["usage"]["input_tokens"]
    counts = producer_counts(p.metrics())
    real = "tokenized" if backend == "inProcess" else "rendered"
    assert counts[real] == 1 and counts["estimated"] == 0 and counts["published_tokens"] == n
    assert n != -(-len((SYSTEM + "user" + question).encode()) // 4)  # not the estimate
