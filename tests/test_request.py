"""OpenAI body parsing (epp.requestcontrol.parsers.openai) and the response parsers
(epp.requestcontrol.responses)."""

from __future__ import annotations

import orjson
import pytest

from epp.errors import InferenceError
from epp.framework import ResponseInfo
from epp.requestcontrol import headers as control
from epp.requestcontrol.director import rewritten_body, subset_ips
from epp.requestcontrol.parsers.openai import kind_from_path, parse_body
from epp.requestcontrol.responses import MAX_SSE_LINE, LineBuffer, ModelNameRestorer, UsageParser


def parse(body: dict | bytes, path: str = "/v1/completions", **headers: str):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return control.apply(parse_body(raw, "rid", path), {k.replace("_", "-"): v for k, v in headers.items()})


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
    r = parse_body(b"", "rid", "/v1/models")
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


# ------------------------------------------------------------------ max_tokens (issue 8 finding 7)
@pytest.mark.parametrize("value", [-1, -1000000000000000000, 10**18, 2**31, 1.5, "10", True, [], {"n": 1}])
@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_bad_max_tokens_are_bad_request(key, value):
    with pytest.raises(InferenceError) as e:
        parse({"model": "m", "prompt": "p", key: value})
    assert e.value.code == "BadRequest" and e.value.http_status == 400
    assert e.value.message.startswith(f"{key} must be an integer from 0 to 2147483647, got ")


def test_max_tokens_bounds_and_precedence():
    assert parse({"model": "m", "prompt": "p", "max_tokens": 0}).max_tokens == 0
    assert parse({"model": "m", "prompt": "p", "max_tokens": 2**31 - 1}).max_tokens == 2**31 - 1
    assert parse({"model": "m", "prompt": "p", "max_tokens": 100.0}).max_tokens == 100
    assert parse({"model": "m", "prompt": "p", "max_tokens": None}).max_tokens is None
    both = {"model": "m", "prompt": "p", "max_tokens": 5, "max_completion_tokens": 9}
    assert parse(both).max_tokens == 9
    for literal in (b"-1e18", b"1e18", b"2147483648.0"):  # JSON floats: integral but out of range
        with pytest.raises(InferenceError, match="max_tokens must be"):
            parse(b'{"model": "m", "prompt": "p", "max_tokens": ' + literal + b"}")


# ------------------------------------------------------------------ bounded response buffers (finding 12)
def test_line_buffer_joins_pieces_and_holds_the_partial_line():
    b = LineBuffer(limit=10)
    assert b.split(b"ab") == b"" and b.split(b"c\nde") == b"abc\n"
    assert (b.size, b.over) == (2, False)
    assert b.split(b"f" * 9) == b"" and b.over
    assert b.take() == b"de" + b"f" * 9 and b.size == 0


def test_usage_parser_sse_holds_at_most_one_line_cap_without_newline():
    p = UsageParser(sse=True)
    chunk = b"x" * 65536
    for _ in range(3 * MAX_SSE_LINE // len(chunk)):  # 3 MiB, no newline
        p.feed(chunk, False)
        assert p._lines.size <= MAX_SSE_LINE
    # the tail of the over-long line is skipped; the events after it are still read
    p.feed(b'x", "usage": {"prompt_tokens": 99}}\ndata: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n', False)
    p.feed(b"", True)
    assert p.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    info = ResponseInfo()
    p.fill(info)
    assert (info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (3, 4, 0)


def test_usage_counts_must_be_non_negative_ints():
    p = UsageParser()
    p.feed(orjson.dumps({"usage": {"prompt_tokens": -5, "completion_tokens": "7",
                                   "prompt_tokens_details": {"cached_tokens": True}}}), True)
    info = ResponseInfo()
    p.fill(info)
    assert (info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (0, 0, 0)


def test_model_name_restorer_passes_an_over_long_sse_line_through():
    r = ModelNameRestorer("t", "m", sse=True)
    out = []
    chunk = b'data: {"model":"t","x":"' + b"y" * 65536
    out.append(r.feed(chunk, False))
    for _ in range(MAX_SSE_LINE // 65536 + 1):
        out.append(r.feed(b"y" * 65536, False))
        assert r._lines.size <= MAX_SSE_LINE
    assert b"".join(out).startswith(b'data: {"model":"t"')  # passed through as written, not held
    tail = r.feed(b'"}\n\ndata: {"model":"t"}\n\n', False)
    assert tail.endswith(b'data: {"model":"m"}\n\n')  # rewriting goes on after the long line
    assert r.feed(b"", True) == b""


def test_model_name_restorer_json_over_cap_passes_through(monkeypatch):
    import epp.requestcontrol.responses as responses

    monkeypatch.setattr(responses, "MAX_JSON_RESPONSE", 100)
    r = ModelNameRestorer("t", "m", sse=False)
    assert r.feed(b'{"model":"t",', False) == b""
    big = b'"pad":"' + b"z" * 200
    assert r.feed(big, False) == b'{"model":"t",' + big
    assert r.feed(b'","model":"t"}', True) == b'","model":"t"}'  # the rest of it too, unrewritten
