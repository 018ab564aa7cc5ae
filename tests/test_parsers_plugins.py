"""Request parsers (requestHandler.parsers): each parser against bodies in the shapes the
reference's parsers read, the chain's resolution (longest claimed suffix, fallback last,
duplicates skipped), and hostile bytes (a clean 400 or a passthrough route, nothing else)."""

from __future__ import annotations

import logging

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.errors import InferenceError
from epp.framework import Parser, extension_points
from epp.framework.registry import plugin_class
from epp.requestcontrol.parsers import DEFAULT_PARSER_TYPES, ParserChain, default_parsers, request_path

PARSER_TYPES = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "sglanghttp-parser", "passthrough-parser")


def make(type_name: str, name: str | None = None) -> Parser:
    return plugin_class(type_name)(name or type_name, None, None)


def parse(type_name: str, body: dict | bytes, path: str):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return make(type_name).parse_request(raw, {":path": path}, "rid", path)


def bad(type_name: str, body: dict | bytes, path: str) -> str:
    with pytest.raises(InferenceError) as e:
        parse(type_name, body, path)
    assert (e.value.code, e.value.http_status) == ("BadRequest", 400)
    return e.value.message


@pytest.mark.parametrize("type_name", PARSER_TYPES)
def test_every_parser_is_a_registered_parser_plugin_without_parameters(type_name):
    cls = plugin_class(type_name)
    assert cls.type_name == type_name and not hasattr(cls, "Params")
    assert "Parser" in extension_points(cls) and isinstance(make(type_name, "mine"), Parser)
    assert make(type_name, "mine").name == "mine"


# --------------------------------------------------------------------------- anthropic
LONG_SYSTEM = "You are a careful assistant. " * 40
MESSAGES = {
    "model": "claude-like",
    "max_tokens": 256,
    "stream": True,
    "system": [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "add"},
                                          {"type": "tool_use", "id": "t1", "name": "calc", "input": {"a": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "4"}]},
                                     {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]},
    ],
    "tools": [{"name": "calc", "input_schema": {"type": "object"}}],
    "cache_salt": "tenant-1",
}


def test_anthropic_messages_fields_and_prompt_text():
    r = parse("anthropic-parser", MESSAGES, "/v1/messages")
    assert (r.kind, r.incoming_model, r.target_model) == ("messages", "claude-like", "claude-like")
    assert (r.max_tokens, r.stream, r.cache_salt) == (256, True, "tenant-1")
    # tools JSON, system text, then role + block text per message (the reference's flattening)
    tools = orjson.dumps(MESSAGES["tools"]).decode()
    assert r.prompt_text == (tools + LONG_SYSTEM + "user" + "What is 2+2?" + "assistant" + "add" + "t1" + "calc"
                             + '{"a":2}' + "user" + "4")
    assert r.body["model"] == "claude-like"  # a parsed map: a model rewrite applies to it


def test_anthropic_same_system_prompt_gives_the_same_prefix():
    a = parse("anthropic-parser", {"model": "m", "system": LONG_SYSTEM, "messages": [
        {"role": "user", "content": "first question"}]}, "/v1/messages")
    b = parse("anthropic-parser", {"model": "m", "system": [{"type": "text", "text": LONG_SYSTEM}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "another"}]}]}, "/v1/messages")
    assert a.prompt_text.startswith(LONG_SYSTEM) and b.prompt_text.startswith(LONG_SYSTEM)


def test_anthropic_model_is_optional_and_count_tokens_is_routed_unparsed():
    r = parse("anthropic-parser", {"messages": [{"role": "user", "content": "x"}]}, "/v1/messages?beta=true")
    assert (r.incoming_model, r.max_tokens, r.stream) == ("", None, False)
    r = parse("anthropic-parser", b"not even json", "/v1/messages/count_tokens")
    assert (r.kind, r.prompt_text, r.body, r.size_bytes) == ("count_tokens", "", None, 13)


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "not valid JSON"),
    (b"[]", "not a JSON object"),
    ({"model": "m"}, "at least one message"),
    ({"model": "m", "messages": []}, "at least one message"),
    ({"messages": ["hi"]}, "a message must be an object"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string or an array"),
    ({"messages": [{"role": "user", "content": [7]}]}, "a content block must be an object"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "text must be a string"),
    ({"messages": [{"role": 3, "content": "x"}]}, "role must be a string"),
    ({"system": {"a": 1}, "messages": [{"role": "user", "content": "x"}]}, "content must be a string"),
    ({"tools": {}, "messages": [{"role": "user", "content": "x"}]}, "tools must be an array"),
    ({"max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}, "max_tokens must be an integer"),
])
def test_anthropic_bad_bodies_are_400(body, message):
    assert message in bad("anthropic-parser", body, "/v1/messages")


def test_anthropic_refuses_a_path_it_does_not_serve():
    assert "unsupported API endpoint" in bad("anthropic-parser", {"messages": [{"role": "user", "content": "x"}]},
                                            "/v1/messages/")


# --------------------------------------------------------------------------- vllm generate
def test_vllmhttp_generate():
    body = {"model": "m", "token_ids": [1, 2, 3.0], "sampling_params": {"max_tokens": 9}, "stream": True,
            "cache_salt": "s"}
    r = parse("vllmhttp-parser", body, "/inference/v1/generate")
    assert (r.kind, r.incoming_model, r.prompt_text, r.max_tokens, r.stream, r.cache_salt) == (
        "generate", "m", "[1,2,3]", 9, True, "s")
    assert r.body is not None  # rewrites apply to its model key
    assert parse("vllmhttp-parser", {"token_ids": [5]}, "/inference/v1/generate").max_tokens is None


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "m"}, "token_ids must be a non-empty array"),
    ({"token_ids": []}, "token_ids must be a non-empty array"),
    ({"token_ids": [1, -1]}, "token_ids[1] is not a token id"),
    ({"token_ids": [2**32]}, "token_ids[0] is not a token id"),
    ({"token_ids": [1.5]}, "token_ids[0] is not a token id"),
    ({"token_ids": ["1"]}, "token_ids[0] is not a token id"),
    ({"token_ids": [1], "sampling_params": {"max_tokens": "9"}}, "max_tokens must be an integer"),
])
def test_vllmhttp_bad_bodies_are_400(body, message):
    assert message in bad("vllmhttp-parser", body, "/inference/v1/generate")


# --------------------------------------------------------------------------- sglang generate
def test_sglanghttp_generate():
    body = {"input_ids": [7, 8], "extra_key": "salt", "sampling_params": {"max_new_tokens": 12}, "stream": False,
            "model": "ignored"}
    r = parse("sglanghttp-parser", body, "/generate")
    assert (r.kind, r.incoming_model, r.prompt_text, r.max_tokens, r.cache_salt, r.body) == (
        "generate", "", "[7,8]", 12, "salt", None)  # forwarded unparsed: no model read, no rewrite
    assert parse("sglanghttp-parser", {"input_ids": [1], "sampling_params": {"max_new_tokens": -3}},
                 "/generate/").max_tokens is None  # an invalid budget is ignored, as in the reference


@pytest.mark.parametrize(("body", "path", "message"), [
    ({"input_ids": [1]}, "/v1/generate", "unsupported path"),
    ({"text": "hello"}, "/generate", "input_ids must be provided"),
    ({"input_ids": [[1, 2], [3]]}, "/generate", "input_ids[0] is not a token id"),  # batches: refused
    ({"input_ids": [1], "extra_key": 5}, "/generate", "extra_key must be a string"),
    ({"input_ids": [1], "stream": "yes"}, "/generate", "stream must be a boolean"),
])
def test_sglanghttp_bad_requests_are_400(body, path, message):
    assert message in bad("sglanghttp-parser", body, path)


# --------------------------------------------------------------------------- passthrough
def test_passthrough_routes_any_body_unparsed():
    r = parse("passthrough-parser", b"\x00\xffnot json at all", "/custom/api")
    assert (r.kind, r.incoming_model, r.prompt_text, r.body, r.size_bytes, r.stream) == (
        "passthrough", "", "", None, 17, False)


# --------------------------------------------------------------------------- openai additions
def test_openai_conversations_images_render_and_responses_budget():
    r = parse("openai-parser", {"model": "m", "items": [{"type": "message", "content": "hi"}]}, "/v1/conversations")
    assert (r.kind, r.prompt_text) == ("conversations", '[{"type":"message","content":"hi"}]')
    r = parse("openai-parser", {"model": "m", "prompt": "a cat"}, "/v1/images/generations")
    assert (r.kind, r.prompt_text) == ("images", "a cat")
    r = parse("openai-parser", {"model": "m", "messages": [{"role": "user", "content": "x"}]},
              "/v1/chat/completions/render")
    assert r.kind == "chat"
    r = parse("openai-parser", {"model": "m", "input": "x", "max_output_tokens": 4, "max_tokens": 99}, "/v1/responses")
    assert r.max_tokens == 4
    assert "without items" in bad("openai-parser", {"model": "m", "items": []}, "/v1/conversations")
    assert "without prompt" in bad("openai-parser", {"model": "m", "prompt": ""}, "/v1/images/generations")
    assert "without input" in bad("openai-parser", {"model": "m", "input": None}, "/v1/responses")


# --------------------------------------------------------------------------- the chain
def test_default_chain_is_the_references_list():
    chain = ParserChain(default_parsers())
    assert [p.type_name for p in chain.parsers] == list(DEFAULT_PARSER_TYPES) == [
        "openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser"]
    assert chain.fallback is chain.parsers[-1]
    resolved = {path: chain.resolve(path).type_name for path in (
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
        "/v1/messages/count_tokens", "/inference/v1/generate", "/generate", "/v1/score", "/", "")}
    assert resolved == {
        "/v1/chat/completions": "openai-parser", "/v1/completions": "openai-parser",
        "/v1/embeddings": "openai-parser", "/v1/responses": "openai-parser", "/v1/messages": "anthropic-parser",
        "/v1/messages/count_tokens": "anthropic-parser", "/inference/v1/generate": "vllmhttp-parser",
        "/generate": "passthrough-parser", "/v1/score": "passthrough-parser", "/": "passthrough-parser",
        "": "openai-parser",  # no path: the reference's default /v1/completions
    }


def test_longest_claimed_suffix_wins_whatever_the_order():
    chain = ParserChain([make("sglanghttp-parser"), make("vllmhttp-parser")])
    assert chain.resolve("/inference/v1/generate").type_name == "vllmhttp-parser"
    assert chain.resolve("/generate").type_name == "sglanghttp-parser"
    chain = ParserChain([make("openai-parser"), make("anthropic-parser")])
    assert chain.resolve("/v1/chat/completions/").type_name == "openai-parser"  # trailing slash ignored


def test_explicit_list_without_fallback_refuses_unclaimed_paths():
    chain = ParserChain([make("openai-parser")])
    with pytest.raises(InferenceError) as e:
        chain.parse(b"{}", {":path": "/v1/messages"}, "rid")
    assert e.value.http_status == 400 and "no parser registered matching path suffix for: /v1/messages" in str(e.value)


def test_parsers_after_the_fallback_and_duplicate_types_are_skipped(caplog):
    caplog.set_level(logging.WARNING, "epp.requestcontrol.parsers")
    chain = ParserChain([make("openai-parser", "a"), make("openai-parser", "b"), make("passthrough-parser", "p"),
                         make("anthropic-parser", "late")])
    assert [p.name for p in chain.parsers] == ["a", "p"]
    assert chain.resolve("/v1/messages").name == "p"
    assert "already listed" in caplog.text and "'late' is listed after the fallback parser 'p'" in caplog.text


def test_request_path_sources_and_query():
    assert request_path({":path": "/v1/messages?beta=true", "x-original-path": "/x"}) == "/v1/messages"
    assert request_path({"x-original-path": "/v1/embeddings"}) == "/v1/embeddings"
    assert request_path({"x-forwarded-path": "/generate"}) == "/generate"
    assert request_path({}) == ""


def test_a_failing_third_party_parser_is_a_400_not_a_crash():
    class Broken:
        type_name = "broken-parser"
        name = "broken"
        paths = ()

        def parse_request(self, body, headers, request_id, path):
            raise KeyError("oops")

    with pytest.raises(InferenceError) as e:
        ParserChain([Broken()]).parse(b"x", {":path": "/"}, "rid")
    assert e.value.http_status == 400 and "KeyError" in e.value.message


# --------------------------------------------------------------------------- hostile input
HOSTILE = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/conversations",
         "/v1/images/generations", "/v1/messages", "/v1/messages/count_tokens", "/inference/v1/generate",
         "/generate", "/v1/other", ""]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.sampled_from(
                               ["model", "messages", "prompt", "input", "items", "system", "content", "role",
                                "type", "text", "tools", "token_ids", "input_ids", "max_tokens", "stream",
                                "sampling_params", "max_new_tokens", "extra_key", "cache_salt", "thinking",
                                "tool_use", "tool_result", "id", "name"]), c, max_size=5), max_leaves=20)
bodies = st.one_of(st.binary(max_size=64), json_values.map(lambda v: orjson.dumps(v)))


def _check_clean(chain: ParserChain, body: bytes, path: str) -> None:
    """The resolved parser itself (not the chain, which turns a stray exception into a 400)
    raises nothing but a 400 InferenceError."""
    headers = {":path": path} if path else {}
    try:
        r = chain.resolve(path).parse_request(body, headers, "rid", request_path(headers))
    except InferenceError as e:
        assert (e.code, e.http_status) == ("BadRequest", 400)
        return
    assert isinstance(r.prompt_text, str) and isinstance(r.incoming_model, str)
    assert r.max_tokens is None or 0 <= r.max_tokens < 2**31


@HOSTILE
@given(body=bodies, path=st.sampled_from(PATHS))
def test_any_bytes_give_a_400_or_a_route_with_the_default_chain(body, path):
    chain = ParserChain(default_parsers())
    _check_clean(chain, body, path)
    if chain.resolve(path).type_name == "passthrough-parser":
        assert chain.parse(body, {":path": path}, "rid").kind == "passthrough"  # routed, never refused


@HOSTILE
@given(body=bodies, path=st.sampled_from(PATHS))
def test_any_bytes_give_a_400_or_a_route_with_every_parser(body, path):
    _check_clean(ParserChain([make("sglanghttp-parser"), make("vllmhttp-parser"), make("anthropic-parser"),
                              make("openai-parser"), make("passthrough-parser")]), body, path)


# --------------------------------------------------------------------------- response usage of these APIs
def _usage(chunks: list[bytes], sse: bool) -> tuple[int, int, int]:
    from epp.framework import ResponseInfo
    from epp.requestcontrol.responses import UsageParser

    p = UsageParser(sse=sse)
    for i, chunk in enumerate(chunks):
        p.feed(chunk, i == len(chunks) - 1)
    info = ResponseInfo()
    p.fill(info)
    return info.prompt_tokens, info.completion_tokens, info.cached_tokens


def test_anthropic_usage_json_and_streamed_in_two_events():
    body = orjson.dumps({"type": "message", "usage": {"input_tokens": 25, "output_tokens": 7,
                                                      "cache_read_input_tokens": 16}})
    assert _usage([body[:9], body[9:]], sse=False) == (25, 7, 16)
    events = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":25,'
              b'"cache_read_input_tokens":8,"output_tokens":1}}}\n\n'
              b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n'
              b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
              b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert _usage([events[:70], events[70:]], sse=True) == (25, 15, 8)


def test_responses_api_usage_json_and_streamed():
    body = orjson.dumps({"usage": {"input_tokens": 31, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 3}}})
    assert _usage([body], sse=False) == (31, 4, 3)
    event = (b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
             b'{"input_tokens":31,"output_tokens":9}}}\n\n')
    assert _usage([event], sse=True) == (31, 9, 0)


def test_bodies_nested_deeper_than_json_can_be_written_back_are_400():
    deep = b"[" * 600 + b"]" * 600
    assert "nests too deeply" in bad("openai-parser", b'{"model": "m", "input": ' + deep + b"}", "/v1/responses")
    assert "nests too deeply" in bad("anthropic-parser", b'{"messages": [{"role": "user", "content": [{"type": '
                                     b'"tool_use", "input": ' + deep + b"}]}]}", "/v1/messages")


def test_resolved_paths_are_remembered_within_a_bound():
    from epp.requestcontrol.parsers import RESOLVE_CACHE_SIZE

    chain = ParserChain(default_parsers())
    for i in range(2 * RESOLVE_CACHE_SIZE + 5):  # client-chosen paths: the memory stays bounded
        assert chain.resolve(f"/x/{i}").type_name == "passthrough-parser"
        assert len(chain._resolved) <= RESOLVE_CACHE_SIZE
    assert chain.resolve("/v1/messages").type_name == "anthropic-parser"
    assert chain.resolve("/v1/messages").type_name == "anthropic-parser"  # from the cache, same answer
    with pytest.raises(InferenceError):  # a refusal is not remembered as a parser
        ParserChain([make("openai-parser")]).resolve("/nope")
