"""token-producer (llm-d-router pkg/epp/framework/plugins/requestcontrol/dataproducer/tokenizer/
tokenizer.go, estimate.go: the estimate backend is the default, 4 bytes per token, the last one
zero-padded; vllm / udsTokenizerConfig / multimodal estimates are precise tokenization, issue 12)
and session-id-producer (dataproducer/sessionid/producer.go: exactly one of headerName |
cookieName; the value trimmed; nothing published when absent)."""

import pytest

from epp.assembly import build_plugin
from epp.config import ConfigError, load_config
from epp.framework import CycleState, InferenceRequest, PluginHandle
from epp.framework.datakeys import SESSION_ID, TOKENIZED_PROMPT


def req(prompt="", headers=None, body=None):
    return InferenceRequest("r", "m", "m", "completions", prompt, headers or {}, body=body)


def tokens(request, params=None):
    p = build_plugin("token-producer", None, params, PluginHandle(), "t")
    cycle = CycleState()
    p.prepare_request_data(cycle, request, [])
    return cycle.read(TOKENIZED_PROMPT)


def test_estimate_is_four_bytes_per_token_rounded_up():
    assert tokens(req("")) == 0
    assert tokens(req("abcd")) == 1
    assert tokens(req("abcde")) == 2  # padded
    assert tokens(req("é" * 4)) == 2  # 8 UTF-8 bytes
    assert tokens(req("x" * 400), {"estimate": {}}) == 100
    assert tokens(req("ignored text", body={"prompt": [1, 2, 3]})) == 3  # the client's token ids


@pytest.mark.parametrize("params, where", [
    ({"vllm": {"url": "http://localhost:8000"}}, "vllm: the vllm tokenizer backend needs precise tokenization (issue 12)"),
    ({"modelName": "m"}, "modelName: the vllm tokenizer backend needs precise tokenization (issue 12)"),
    ({"udsTokenizerConfig": {"socketFile": "/x"}, "modelName": "m"},
     "udsTokenizerConfig: the udsTokenizerConfig tokenizer backend needs precise tokenization (issue 12)"),
    ({"estimate": {"image": {"mode": "static"}}}, "estimate.image: multimodal token estimation needs precise "
                                                    "tokenization (issue 12)"),
    ({"estimate": {}, "vllm": {}}, "vllm: only one of 'estimate', 'vllm' or 'udsTokenizerConfig' may be set"),
])
def test_other_backends_are_refused_naming_issue_12(params, where):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(params))
    assert f"plugins[0].parameters.{where}" in str(e.value)


def _yaml(params):
    import json
    return f"plugins: [{{type: token-producer, parameters: {json.dumps(params)}}}]"


def test_deprecated_tokenizer_alias_is_the_token_producer():
    cfg = load_config("plugins: [{type: tokenizer, parameters: {estimate: {}}}]")
    assert cfg.plugin("tokenizer").type == "token-producer"


def session(params, headers):
    p = build_plugin("session-id-producer", None, params, PluginHandle(), "t")
    cycle = CycleState()
    p.prepare_request_data(cycle, req(headers=headers), [])
    return cycle.read(SESSION_ID)


def test_session_id_from_a_header_or_a_cookie():
    assert session({"headerName": " X-Session-ID "}, {"x-session-id": "  abc "}) == "abc"
    assert session({"headerName": "x-session-id"}, {}) is None
    assert session({"headerName": "x-session-id"}, {"x-session-id": "  "}) is None
    assert session({"cookieName": "sid"}, {"cookie": "a=1; sid=s-42; b=2"}) == "s-42"
    assert session({"cookieName": "sid"}, {"cookie": "sidx=1; a"}) is None
    assert session({"cookieName": "sid"}, {}) is None


@pytest.mark.parametrize("params, message", [
    ("{}", "headerName: session-id-producer requires exactly one of headerName or cookieName"),
    ("{headerName: ' '}", "headerName: session-id-producer requires exactly one of headerName or cookieName"),
    ("{headerName: a, cookieName: b}", "cookieName: session-id-producer requires exactly one of headerName or "
                                       "cookieName, not both"),
])
def test_session_id_producer_needs_exactly_one_source(params, message):
    with pytest.raises(ConfigError) as e:
        load_config(f"plugins: [{{type: session-id-producer, parameters: {params}}}]")
    assert f"plugins[0].parameters.{message}" in str(e.value)
