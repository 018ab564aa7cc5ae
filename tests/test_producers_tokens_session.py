"""token-producer (llm-d-router pkg/epp/framework/plugins/requestcontrol/dataproducer/tokenizer/
tokenizer.go, estimate.go: the estimate backend is the default, 4 bytes per token, the last one
zero-padded; the vllm, udsTokenizerConfig and inProcess backends: tests/test_tokenization.py)
and session-id-producer (dataproducer/sessionid/producer.go: exactly one of headerName |
cookieName; the value trimmed; nothing published when absent), read by session-affinity-scorer's
session_id strategy (scheduling/scorer/sessionaffinity/, scheduling/util/sessionaffinity/session_id.go,
header.go)."""

import base64

import pytest

from epp.assembly import build_plugin
from epp.config import ConfigError, load_config
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ResponseInfo,
)
from epp.framework.datakeys import SESSION_ID, TOKEN_IDS, TOKENIZED_PROMPT
from tests.helpers import result


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


@pytest.mark.parametrize("body", [{"prompt": [1, 2, 3]}, {"input": [1, 2, 3]}, {"token_ids": [1, 2, 3]},
                                  {"prompt_token_ids": [1, 2, 3]}])
def test_the_estimate_backend_publishes_the_clients_token_ids(body):
    """As the reference's estimate backend passes pre-tokenized prompts through: the ids
    under TOKEN_IDS (what precise-prefix-cache-producer reads), counted as client_ids."""
    p = build_plugin("token-producer", None, None, PluginHandle(), "t")
    cycle = CycleState()
    p.prepare_request_data(cycle, req("ignored text", body=body), [])
    assert cycle.read(TOKEN_IDS) == (1, 2, 3) and cycle.read(TOKENIZED_PROMPT) == 3
    assert p.counts["client_ids"] == 1 and p.counts["estimated"] == 0 and p.tokens_published == 3
    p.prepare_request_data(cycle := CycleState(), req("abcdefgh", body={"prompt": [1, True]}), [])
    assert cycle.read(TOKEN_IDS) is None and cycle.read(TOKENIZED_PROMPT) == 2 and p.counts["estimated"] == 1


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


# --------------------------------------------------------------------------- session-affinity-scorer
def _eps():
    return [Endpoint(f"e{i}", f"10.0.0.{i}", 8000, namespace="ns") for i in (1, 2, 3)]


class _Session:
    """session-id-producer (cookie) + session-affinity-scorer (session_id strategy), one cycle each."""

    def __init__(self, scorer_params, now):
        h = PluginHandle(clock=lambda: now[0])
        self.producer = build_plugin("session-id-producer", None, {"cookieName": "sid"}, h, "t")
        self.scorer = build_plugin("session-affinity-scorer", None, scorer_params, h, "t")

    def route(self, cookie, candidates, pick):
        request = req(headers={"cookie": f"sid={cookie}"} if cookie else {})
        cycle = CycleState()
        self.producer.prepare_request_data(cycle, request, candidates)
        scores = self.scorer.score(cycle, request, candidates)
        self.scorer.pre_request(cycle, request, result(pick))
        return scores


def test_session_id_strategy_binds_keeps_and_migrates_reading_the_producer():
    """scheduling/util/sessionaffinity/session_id.go: Choose, PreRequest, runEviction."""
    a, b, c = _eps()
    now = [0.0]
    s = _Session({"strategy": "session_id", "sessionIdConfig": {
        "sources": [{"header": "X-Tenant-Session"}, {"attribute": "SessionIDDataKey", "producer": "session-id-producer"}],
        "evictionTtlSeconds": 30, "evictionSweepSeconds": 5}}, now)
    assert s.route("s1", [a, b, c], pick=b) == [0.0, 0.0, 0.0]  # unbound: no preference; bound to b
    assert s.route("s1", [a, b, c], pick=b) == [0.0, 1.0, 0.0]
    assert s.route("s1", [a, b, c], pick=c) == [0.0, 1.0, 0.0]  # b was a candidate but lost: binding kept
    assert s.route("s1", [a, b, c], pick=a) == [0.0, 1.0, 0.0]
    assert s.route("s1", [a, c], pick=c) == [0.0, 0.0]  # b gone from the candidates: re-bound to c
    assert s.route("s1", [a, b, c], pick=a) == [0.0, 0.0, 1.0]
    assert s.route("", [a, b, c], pick=a) == [0.0, 0.0, 0.0]  # no session: no binding made
    assert set(s.scorer.bindings) == {"s1"}
    now[0] = 31.0  # unused past the TTL: swept at the next commit (sweep interval 5 s)
    s.route("s2", [a, b, c], pick=a)
    assert set(s.scorer.bindings) == {"s2"}
    # the header source comes first
    request = req(headers={"x-tenant-session": " s2 ", "cookie": "sid=other"})
    cycle = CycleState()
    s.producer.prepare_request_data(cycle, request, [a])
    assert s.scorer.session_id(cycle, request) == "s2"


def test_session_id_strategy_defaults_to_the_x_session_id_header_and_bindings_are_bounded(monkeypatch):
    a, b, _ = _eps()
    p = build_plugin("session-affinity-scorer", None, {"strategy": "session_id"}, PluginHandle(), "t")
    assert (p.bindings.ttl, p.bindings.sweep_every) == (300.0, 10.0)
    monkeypatch.setattr(p.bindings, "bound", 2)  # MAX_SESSIONS
    for sid in ("x", "y", "z"):
        p.pre_request(CycleState(), req(headers={"x-session-id": sid}), result(a))
    assert list(p.bindings) == ["y", "z"]
    assert p.score(CycleState(), req(headers={"x-session-id": "z"}), [a, b]) == [1.0, 0.0]


def test_encoded_header_strategy_with_a_custom_header_and_profile():
    a, b, _ = _eps()
    p = build_plugin("session-affinity-scorer", None, {"encodedEndpointHeaderConfig": {"header": "X-Sticky"},
                                                      "profileName": "prefill"}, PluginHandle(), "t")
    token = base64.standard_b64encode(b"ns/e2").decode()
    assert p.score(CycleState(), req(headers={"x-sticky": token}), [a, b]) == [0.0, 1.0]
    request = req()
    p.pre_request(CycleState(), request, result(a, prefill=b))
    info = ResponseInfo()
    p.response_received(request, info, a)
    assert base64.standard_b64decode(info.set_headers["x-sticky"]) == b"ns/e2"  # the prefill profile's target
    other = ResponseInfo()
    p.response_received(req(), other, a)  # no result for that profile: nothing written
    assert other.set_headers == {}


@pytest.mark.parametrize("params, message", [
    ("{strategy: sticky}", "strategy: must be 'encoded_endpoint_header' or 'session_id', got 'sticky'"),
    ("{strategy: session_id, sessionIdConfig: {sources: [{header: a, attribute: b}]}}",
     "sessionIdConfig.sources[0]: exactly one of header or attribute must be set"),
    ("{strategy: session_id, sessionIdConfig: {sources: [{producer: p}]}}",
     "sessionIdConfig.sources[0]: exactly one of header or attribute must be set"),
    ("{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: -1}}",
     "sessionIdConfig.evictionTtlSeconds: must be > 0, got -1.0"),
])
def test_session_affinity_parameters_are_checked(params, message):
    with pytest.raises(ConfigError) as e:
        load_config(f"plugins: [{{type: session-affinity-scorer, parameters: {params}}}]")
    assert f"plugins[0].parameters.{message}" in str(e.value)
