"""OpenAI body parsing (epp.requestcontrol.parsers.openai) and the response parsers of the director."""

from __future__ import annotations

import orjson
import pytest

from epp.errors import InferenceError
from epp.requestcontrol.director import ModelNameRestorer, UsageParser, subset_ips
from epp.requestcontrol.parsers.openai import kind_from_path, parse_request, rewritten_body


def parse(body: dict | bytes, path: str = "/v1/completions", **headers: str):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_request(raw, {k.replace("_", "-"): v for k, v in headers.items()}, "rid", path)


def test_completions_prompt_string_and_list():
    assert parse({"model": "m", "prompt": "a b"}).prompt_text == "a b"
    r = parse({"model": "m", "prompt": ["one", "two"], "max_tokens": 7, "stream": True, "cache_salt": "s"})
    assert (r.kind, r.prompt_text, r.max_tokens, r.stream, r.cache_salt) == ("completions", "one two", 7, True, "s")
    assert r.target_model == r.incoming_model == "m"


def test_chat_messages_are_serialised_json():
    messages = [{"role": "user", "content": "hi"}]
    r = parse({"model": "m", "messages": messages, "max_completion_tokens": 3}, "/v1/chat/completions")
    assert r.kind == "chat" and r.prompt_text == orjson.dumps(messages).decode() and r.max_tokens == 3


@pytest.mark.parametrize(("path", "kind"), [("/v1/responses", "responses"), ("/v1/embeddings", "embeddings")])
def test_responses_and_embeddings_use_json_input(path, kind):
    r = parse({"model": "m", "input": ["x", "y"]}, path)
    assert (r.kind, r.prompt_text) == (kind, '["x","y"]')
    assert parse({"model": "m", "input": "plain"}, path).prompt_text == "plain"


def test_kind_from_path_and_body_fallback():
    assert kind_from_path("/v1/chat/completions?x=1") == "chat"
    assert kind_from_path("/v1/completions") == "completions"
    assert kind_from_path("/generate") == ""
    assert parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "/other").kind == "chat"


def test_headers():
    r = parse({"model": "m", "prompt": "p"}, x_gateway_inference_fairness_id="tenant-a",
              x_gateway_inference_objective="critical")
    assert (r.fairness_id, r.objective) == ("tenant-a", "critical")
    assert parse({"model": "m", "prompt": "p"}).fairness_id == "default-flow"


@pytest.mark.parametrize(("body", "path", "message"), [
    (b"{not json", "/v1/completions", "not valid JSON"),
    (b"[1, 2]", "/v1/completions", "not a JSON object"),
    (b'{"prompt": "x"}', "/v1/completions", "model not found"),
    (b'{"model": "m"}', "/v1/completions", "without prompt"),
    (b'{"model": "m", "prompt": "x"}', "/v1/chat/completions", "without messages"),
    (b'{"model": "m", "messages": []}', "/v1/chat/completions", "without messages"),
    (b'{"model": "m"}', "/v1/embeddings", "without input"),
])
def test_bad_bodies_are_bad_request(body, path, message):
    with pytest.raises(InferenceError) as e:
        parse(body, path)
    assert e.value.code == "BadRequest" and e.value.http_status == 400 and message in e.value.message


def test_empty_body_is_bodiless():
    r = parse_request(b"", {}, "rid", "/v1/models")
    assert (r.kind, r.target_model) == ("none", "")


def test_rewritten_body_keeps_other_fields():
    r = parse({"model": "m", "prompt": "p", "temperature": 0.5})
    r.target_model = "m2"
    assert orjson.loads(rewritten_body(r)) == {"model": "m2", "prompt": "p", "temperature": 0.5}


def test_usage_from_sse_split_across_chunks():
    p = UsageParser(sse=True)
    events = b'data: {"choices":[]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
    cut = events.index(b"usage") + 2
    p.feed(events[:cut], False)
    assert p.usage is None
    p.feed(events[cut:], False)
    p.feed(b"data: [DONE]\n\n", True)
    assert p.usage == {"prompt_tokens": 5, "completion_tokens": 9}


def test_usage_from_json_body():
    p = UsageParser()
    body = orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                   "prompt_tokens_details": {"cached_tokens": 1}}})
    p.feed(body[:5], False)
    p.feed(body[5:], True)
    assert p.usage["prompt_tokens_details"] == {"cached_tokens": 1}


def test_model_name_restored_line_by_line():
    r = ModelNameRestorer("big/m-v2", "m", sse=True)
    out = r.feed(b'data: {"model":"big/m-v2","x":1}\n\ndata: {"model": "big/', False)
    assert out == b'data: {"model":"m","x":1}\n\n'
    assert r.feed(b'm-v2"}\n\n', True) == b'data: {"model": "m"}\n\n'
    j = ModelNameRestorer("t", "a\\b", sse=False)
    assert j.feed(b'{"model":', False) == b""
    assert orjson.loads(j.feed(b'"t","id":"t"}', True)) == {"model": "a\\b", "id": "t"}


def test_subset_ips():
    assert subset_ips(["10.0.0.1:80", "[fd00::1]:80", "10.0.0.2", "fd00::2"]) == {
        "10.0.0.1", "fd00::1", "10.0.0.2", "fd00::2"}
