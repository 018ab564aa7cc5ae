"""token-producer's real tokenizers (issue 12, part 3): the in-process backend (tokenizers +
built-in chat templates, tests/fixtures/tokenizer), the vllm backend (vLLM's render endpoints,
as llm-d-router's tokenizer/vllm_http.go calls them), their caches, bounds, timeouts and
fallback to the estimate, the parameters, and the simulator tokenizing and rendering with the
same files."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from devstack.launch import free_port
from epp.assembly import build_plugin
from epp.config import ConfigError, load_config
from epp.framework import CycleState, InferenceRequest, PluginHandle
from epp.framework.datakeys import TOKEN_IDS, TOKENIZED_PROMPT
from epp.requestcontrol.producers.tokens_local import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    LocalTokenizer,
    PieceCache,
    TokenizerError,
    find_tokenizer_dir,
)
from epp.requestcontrol.producers.tokens_messages import messages_to_chat
from epp.requestcontrol.producers.tokens_render import (
    MESSAGES_RENDER_PATH,
    RenderCache,
    RenderError,
    parse_render_response,
    render_body,
    render_key,
)
from simulator.clock import AsyncioClock
from simulator.server import SimConfig, SimServer
from simulator.tokenizer import FileTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer"
MODEL = "org/tiny-chat"
SYSTEM = "You are the endpoint picker's assistant. Answer briefly and cite the README. " * 8


@pytest.fixture(scope="module")
def tok() -> LocalTokenizer:
    return LocalTokenizer.load(FIXTURE)


def chat(user: str, system: str = SYSTEM, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            **extra}


def request(body, kind="chat", rid="r") -> InferenceRequest:
    return InferenceRequest(rid, MODEL, MODEL, kind, "", {"authorization": "Bearer k"}, body=body)


def produce(p, req):
    cycle = CycleState()
    p.prepare_request_data(cycle, req, [])
    return cycle.read(TOKEN_IDS.of(p.name)), cycle.read(TOKENIZED_PROMPT.of(p.name))


# --------------------------------------------------------------------------- in process
def test_fixture_is_small_and_its_chat_template_is_the_built_in_chatml(tok):
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 300_000
    assert tok.template_name == "chatml" and tok.template == CHATML_TEMPLATE and tok.piecewise
    assert tok.vocab_size == 2000
    text = tok.render_chat(chat("hi")["messages"])
    assert text == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True) == \
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"  # no second assistant header
    assert tok.render_chat([{"role": "user", "content": "a"}], False) == "<|im_start|>user\na"


def test_llama3_template_trims_content_and_starts_with_bos():
    t = LocalTokenizer(LocalTokenizer.load(FIXTURE).tokenizer, {"chat_template": LLAMA3_TEMPLATE,
                                                                 "bos_token": {"content": "<|begin_of_text|>"}})
    assert t.template_name == "llama3"
    assert t.render_chat([{"role": "user", "content": "  hi \n"}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_ids_are_the_library_encoding_of_the_rendered_text_and_the_system_prompt_is_encoded_once(tok):
    tok.cache = PieceCache()
    ids = tok.tokenize_body("chat", chat("first question"))
    assert ids == tok.tokenizer.encode(tok.render_chat(chat("first question")["messages"]),
                                       add_special_tokens=False).ids
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")
    misses = tok.cache.misses
    again = tok.tokenize_body("chat", chat("second question"))
    assert tok.cache.misses == misses and tok.cache.hits >= 1  # the long system piece came from the cache
    k = len(tok.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"))
    assert again[:k] == ids[:k] and again[k:] != ids[k:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", " ", "\n", "a", "word", "é",
                                 "  spaced ", "x" * 300, "Ünïcödé 中文 ", "12345", "!?"]), max_size=30))
def test_piecewise_encoding_equals_whole_text_encoding(text_parts):
    tok = LocalTokenizer.load(FIXTURE)
    text = "".join(text_parts)
    assert tok.encode(text) == tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == tok.encode(text)  # second time from the cache


async def test_warm_encodes_long_new_pieces_off_the_loop_so_prepare_data_finds_them_cached():
    p = build_plugin("token-producer", "tp", {"inProcess": {"path": str(FIXTURE)}}, PluginHandle(), "x")
    long_system = "A long system prompt about routing and caches. " * 60  # > OFFLOAD_MIN_CHARS
    req = request(chat("q", system=long_system))
    piece = f"system\n{long_system}"
    assert piece not in p.local.cache
    await p.prefetch_request_data(req)
    assert piece in p.local.cache
    misses = p.local.cache.misses
    ids, _ = produce(p, req)
    assert p.local.cache.misses == misses and ids == tuple(LocalTokenizer.load(FIXTURE).tokenize_body("chat",
                                                                                                      req.body))
    await p.prefetch_request_data(request({"messages": "not a list"}))  # never raises


@pytest.mark.parametrize("system", [SYSTEM, "A long system prompt about routing and caches. " * 60])
async def test_in_process_backend_renders_the_chat_template_once_per_request(system):
    p = build_plugin("token-producer", "tp", {"inProcess": {"path": str(FIXTURE)}}, PluginHandle(), "x")
    renders = []
    render_chat = p.local.render_chat
    p.local.render_chat = lambda *a, **k: renders.append(1) or render_chat(*a, **k)
    req = request(chat("q", system=system))
    await p.prefetch_request_data(req)
    ids, count = produce(p, req)
    assert len(renders) == 1 and ids == tuple(LocalTokenizer.load(FIXTURE).tokenize_body("chat", req.body))
    bad = request({"messages": [{"role": "user", "content": [{"type": "x"}]}]}, rid="bad")
    await p.prefetch_request_data(bad)
    assert produce(p, bad)[0] is None and len(renders) == 2 and p.counts["estimated"] == 1
    assert not p._prefetched  # taken by PrepareData
    produce(p, request(chat("explain me"), rid="not prefetched"))
    assert len(renders) == 3 and p.counts["tokenized"] == 2


async def test_prefetched_results_wait_per_request_object_and_are_bounded(monkeypatch):
    """Two requests with the same id header each get their own prompt; results a failed
    cycle never took (no PrepareData) are bounded by count and by size."""
    from epp.requestcontrol.producers import tokens

    p = build_plugin("token-producer", "tp", {"inProcess": {"path": str(FIXTURE)}}, PluginHandle(), "x")
    a, b = request(chat("first question")), request(chat("another question entirely"))  # both id "r"
    await p.prefetch_request_data(a)
    await p.prefetch_request_data(b)
    expected = LocalTokenizer.load(FIXTURE)
    assert produce(p, a)[0] == tuple(expected.tokenize_body("chat", a.body))
    assert produce(p, b)[0] == tuple(expected.tokenize_body("chat", b.body))
    assert not p._prefetched and p._prefetched_units == 0
    monkeypatch.setattr(tokens, "PREFETCHED_MAX_UNITS", 3 * len(expected.prompt("chat", a.body)[0]))
    left = [request(chat("first question"), rid=f"r{i}") for i in range(10)]  # their cycles failed
    for r in left:
        await p.prefetch_request_data(r)
    assert len(p._prefetched) == 3 and p._prefetched_units <= tokens.PREFETCHED_MAX_UNITS
    assert produce(p, left[-1])[0] is not None and produce(p, left[0])[0] is not None  # evicted: rendered again


def test_piece_cache_is_bounded_by_tokens():
    cache = PieceCache(max_tokens=10)
    for i in range(20):
        cache.put(f"p{i}", [i] * 3)
    assert cache.tokens <= 10 and len(cache) == 3 and cache.get("p19") == [19] * 3 and cache.get("p0") is None
    cache.put("huge", [1] * 11)
    assert cache.get("huge") is None


def test_hugging_face_cache_layout_is_found_without_network(tmp_path):
    repo = tmp_path / "models--org--tiny-chat"
    for rev in ("aaa", "bbb"):
        shutil.copytree(FIXTURE, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb\n")
    assert find_tokenizer_dir(model=MODEL, hub_cache=str(tmp_path)) == repo / "snapshots" / "bbb"
    assert find_tokenizer_dir(model="org/absent", hub_cache=str(tmp_path)) is None
    assert find_tokenizer_dir(path=str(FIXTURE / "tokenizer.json")) == FIXTURE
    assert find_tokenizer_dir(path=str(tmp_path)) is None


def test_an_unknown_chat_template_is_refused_naming_the_vllm_backend(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="cannot render.*use the vllm backend"):
        LocalTokenizer.load(tmp_path / "m").require_chat_template()
    (tmp_path / "m" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        LocalTokenizer.load(tmp_path / "m")


def test_requests_the_template_cannot_render_are_refused(tok):
    with pytest.raises(TokenizerError, match=r"messages\[0\].content"):
        tok.tokenize_body("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    with pytest.raises(TokenizerError, match="tools"):
        tok.tokenize_body("chat", chat("x", tools=[{"type": "function"}]))
    assert tok.tokenize_body("embeddings", {"input": "x"}) is None


def test_in_process_backend_publishes_ids_and_count_and_falls_back_to_the_estimate(tok):
    p = build_plugin("token-producer", "tp", {"inProcess": {"path": str(FIXTURE)}}, PluginHandle(), "x")
    body = chat("how many tokens?")
    ids, count = produce(p, request(body))
    assert ids == tuple(tok.tokenize_body("chat", body)) and count == len(ids)
    ids, count = produce(p, request({"prompt": "hello world"}, "completions"))
    assert ids == tuple(tok.tokenizer.encode("hello world").ids)
    ids, count = produce(p, InferenceRequest("r", MODEL, MODEL, "chat", "abcdefgh", {},
                                             body={"messages": [{"role": "user", "content": [{"type": "x"}]}]}))
    assert ids is None and count == 2  # estimate: ceil(8 / 4)
    assert produce(p, request({"prompt": [5, 6, 7]}, "completions")) == ((5, 6, 7), 3)  # the client's ids
    assert p.counts["tokenized"] == 2 and p.counts["estimated"] == 1 and p.counts["client_ids"] == 1


def test_model_name_alone_uses_the_hugging_face_cache_when_the_tokenizer_is_there(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "models--org--tiny-chat" / "snapshots" / "r1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert build_plugin("token-producer", "t", {"modelName": MODEL}, PluginHandle(), "x").backend == "inProcess"
    assert build_plugin("token-producer", "t", {"modelName": "org/other"}, PluginHandle(), "x").backend == "vllm"
    cfg = tmp_path / "models--org--jinja-only" / "snapshots" / "r1"
    shutil.copytree(FIXTURE, cfg)
    (cfg / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert build_plugin("token-producer", "t", {"modelName": "org/jinja-only"}, PluginHandle(), "x").backend == "vllm"
    with pytest.raises(ValueError, match="loads the UDS sidecar's tokenizer files in process"):
        build_plugin("token-producer", "t", {"modelName": "org/other", "udsTokenizerConfig": {"socketFile": "/s"}},
                     PluginHandle(), "x")
    uds = build_plugin("token-producer", "t", {"modelName": "m", "udsTokenizerConfig": {
        "socketFile": "/tmp/tok.sock", "modelTokenizerMap": {"m": str(FIXTURE)}}}, PluginHandle(), "x")
    assert uds.backend == "inProcess" and uds.local.source == str(FIXTURE)


# --------------------------------------------------------------------------- parameters
def _yaml(params):
    return f"plugins: [{{type: token-producer, parameters: {json.dumps(params)}}}]"


@pytest.mark.parametrize("params, where", [
    ({"vllm": {"url": "http://x"}}, "modelName: must be specified for the vllm backend"),
    ({"modelName": "m", "vllm": {"endpointDiscovery": {}}}, "vllm.endpointDiscovery: rendering on the discovered "
                                                            "endpoints is not built yet"),
    ({"modelName": "m", "vllm": {"timeout": "soon"}}, "vllm.timeout: expected a duration"),
    ({"modelName": "m", "vllm": {"timeout": 0}}, "vllm.timeout: must be positive"),
    ({"modelName": "m", "vllm": {"url": "localhost:8000"}}, "vllm.url: must be an http:// or https:// URL"),
    ({"modelName": "m", "vllm": {"bogus": 1}}, "vllm.bogus: unknown parameter"),
    ({"modelName": "m", "vllm": {"messagesRenderMode": "x"}}, "vllm.messagesRenderMode: must be auto, native"),
    ({"modelName": "m", "vllm": {"clientCertPath": "/c"}}, "vllm.clientCertPath: clientCertPath and clientKeyPath"),
    ({"modelName": "m", "vllm": {"prefillOnly": "yes"}}, "vllm.prefillOnly: expected a boolean, got 'yes'"),
    ({"modelName": "m", "vllm": {"insecureSkipVerify": 1}}, "vllm.insecureSkipVerify: expected a boolean, got 1"),
    ({"modelName": "m", "vllm": {"caCertPath": 5}}, "vllm.caCertPath: expected a string, got 5"),
    ({"modelName": "m", "vllm": "http://x"}, "vllm: expected a mapping, got 'http://x'"),
    ({"modelName": 3}, "modelName: expected a string, got 3"),
    ({"estimate": {}, "vllm": {}}, "vllm: only one of 'estimate', 'vllm', 'udsTokenizerConfig' or 'inProcess'"),
    ({"vllm": {}, "udsTokenizerConfig": {"socketFile": "/s"}, "modelName": "m"}, "udsTokenizerConfig: only one of"),
    ({"udsTokenizerConfig": {"socketFile": "/s"}}, "modelName: must be specified for the uds backend"),
    ({"udsTokenizerConfig": {"socketFile": "/s", "x": 1}, "modelName": "m"}, "udsTokenizerConfig.x: unknown parameter "
     "(known: huggingFaceToken, modelTokenizerMap, socketFile, tokenizersCacheDir, useTCP)"),
    ({"udsTokenizerConfig": {"socketFile": "/s", "useTCP": "yes"}, "modelName": "m"},
     "udsTokenizerConfig.useTCP: expected a boolean, got 'yes'"),
    ({"udsTokenizerConfig": {"socketFile": "/s", "modelTokenizerMap": {"m": 3}}, "modelName": "m"},
     "udsTokenizerConfig.modelTokenizerMap.m: expected a string, got 3"),
    ({"inProcess": {}}, "inProcess.path: a tokenizer directory"),
    ({"inProcess": {"path": 3}}, "inProcess.path: expected a string, got 3"),
    ({"inProcess": {"path": "/m", "hfCacheDir": []}}, "inProcess.hfCacheDir: expected a string, got []"),
    ({"inProcess": {"dir": "/m"}}, "inProcess.dir: unknown parameter (known: hfCacheDir, path)"),
    ({"estimate": {"text": {}}}, "estimate.text: unknown parameter (known: audio, image, video)"),
    ({"estimate": {"image": {"mode": "static"}}}, "estimate.image: multimodal token estimation is not built yet"),
])
def test_bad_parameters_are_refused_naming_the_key(params, where):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(params))
    assert f"plugins[0].parameters.{where}" in str(e.value)


def test_a_missing_tokenizer_stops_start_up(tmp_path):
    with pytest.raises(ValueError, match="inProcess.path: no tokenizer.json"):
        build_plugin("token-producer", "t", {"inProcess": {"path": str(tmp_path)}}, PluginHandle(), "x")


def test_the_reference_vllm_configuration_is_accepted():
    p = build_plugin("token-producer", "t", {"modelName": "m", "vllm": {
        "url": "http://render:8000/", "timeout": "2s", "mmTimeout": "10s", "messagesRenderMode": "native",
        "prefillOnly": True}}, PluginHandle(), "x")
    assert p.backend == "vllm" and p.render.base == "http://render:8000"
    assert p.render.timeout_for("completions") == 2.0 and p.render.timeout_for("chat") == 10.0


# --------------------------------------------------------------------------- render responses
_GENERATE = st.fixed_dictionaries({"token_ids": st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=50)},
                                  optional={"request_id": st.text(max_size=8), "features": st.none(),
                                            "sampling_params": st.dictionaries(st.text(max_size=5), st.integers(0, 1 << 20)),
                                            "model": st.text(max_size=8)})


@given(_GENERATE)
def test_render_answers_of_vllm_shape_parse_to_their_token_ids(doc):
    assert parse_render_response("chat", orjson.dumps(doc)) == tuple(doc["token_ids"])
    assert parse_render_response("completions", orjson.dumps([doc, {"token_ids": [9]}])) == tuple(doc["token_ids"])


@given(st.one_of(st.binary(max_size=64), st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["token_ids", "x"]), inner,
                                                                max_size=3), max_leaves=12).map(orjson.dumps)))
def test_anything_else_is_a_render_error_never_a_crash(data):
    for kind in ("chat", "completions"):
        try:
            ids = parse_render_response(kind, data)
        except RenderError:
            continue
        assert ids and all(type(t) is int and 0 <= t < 2 ** 32 for t in ids)


def test_render_cache_key_ignores_sampling_fields_and_the_cache_is_bounded():
    a = render_key("chat", chat("q", temperature=0.1, max_tokens=5, stream=True), MODEL)
    assert a == render_key("chat", chat("q"), MODEL)
    assert a != render_key("chat", chat("q2"), MODEL) != render_key("completions", chat("q"), MODEL)
    assert a != render_key("chat", chat("q"), "other-model")
    cache = RenderCache(max_entries=3, max_tokens=100)
    for i in range(5):
        cache.put(bytes([i]), (i,) * 10)
    assert len(cache) == 3 and cache.get(bytes([0])) is None and cache.get(bytes([4])) == (4,) * 10
    cache.put(b"big", (1,) * 95)
    assert cache.tokens <= 100 and cache.get(b"big") is not None
    assert render_body(chat("q", max_tokens=500, min_tokens=3), "m2", True) == {**chat("q"), "model": "m2",
                                                                                "max_tokens": 1, "min_tokens": 0}


# --------------------------------------------------------------------------- the vllm backend
class FakeRenderer:
    """A render service whose answer, delay and status the test sets; counts its calls."""

    def __init__(self, ids=(1, 2, 3)) -> None:
        self.ids, self.delay, self.status, self.calls, self.seen = list(ids), 0.0, 200, 0, []
        self.statuses: dict[str, int] = {}  # path -> status, overriding `status`

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.seen.append((request.path, request.headers.get("authorization"), await request.json()))
        await asyncio.sleep(self.delay)
        doc = {"request_id": "x", "token_ids": self.ids, "sampling_params": {}}
        return web.json_response([doc] if request.path.endswith("/v1/completions/render") else doc,
                                 status=self.statuses.get(request.path, self.status))


@pytest.fixture
async def renderer():
    fake = FakeRenderer()
    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions/render", fake.handle),
                    web.post("/v1/completions/render", fake.handle),
                    web.post("/v1/messages/render", fake.handle)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield fake
    await runner.cleanup()


def vllm_producer(url, **vllm):
    return build_plugin("token-producer", "tp", {"modelName": MODEL, "vllm": {"url": url, **vllm}},
                        PluginHandle(), "x")


async def test_a_render_answer_arriving_in_many_chunks_is_read_whole_and_an_oversized_one_refused(renderer,
                                                                                                    monkeypatch):
    import epp.requestcontrol.producers.tokens_render as tokens_render

    renderer.ids = list(range(100_000))  # ~0.6 MB of JSON: more than one read's worth of the socket
    p = vllm_producer(renderer.url)
    req = request(chat("a long one"))
    await p.prefetch_request_data(req)
    assert produce(p, req) == (tuple(renderer.ids), 100_000) and p.counts["rendered"] == 1
    monkeypatch.setattr(tokens_render, "MAX_RESPONSE_BYTES", 100_000)
    req = request(chat("too long an answer"), rid="r2")
    await p.prefetch_request_data(req)
    assert produce(p, req)[0] is None and p.counts["fallback_error"] == 1  # refused: the estimate instead
    await p.stop_background()


async def test_vllm_backend_renders_once_per_body_and_forwards_model_and_authorization(renderer):
    p = vllm_producer(renderer.url)
    body = chat("q", temperature=0.5)
    req = request(body)
    req.target_model = "rewritten"
    await p.prefetch_request_data(req)
    assert produce(p, req) == ((1, 2, 3), 3)
    path, auth, sent = renderer.seen[0]
    assert (path, auth, sent["model"], sent["messages"]) == ("/v1/chat/completions/render", "Bearer k",
                                                             "rewritten", body["messages"])
    again = request(chat("q", temperature=0.9), rid="r2")
    again.target_model = "rewritten"
    await p.prefetch_request_data(again)
    assert produce(p, again) == ((1, 2, 3), 3) and renderer.calls == 1
    await p.prefetch_request_data(request({"prompt": "text"}, "completions", "r3"))
    assert renderer.seen[-1][0] == "/v1/completions/render"
    assert p.counts["rendered"] == 2 and p.counts["render_cached"] == 1
    session = p.render._session
    await p.stop_background()  # the server's shutdown closes the render session
    assert session is not None and session.closed


async def test_concurrent_identical_bodies_share_one_render(renderer):
    p = vllm_producer(renderer.url)
    renderer.delay = 0.05
    reqs = [request(chat("same"), rid=f"r{i}") for i in range(5)]
    await asyncio.gather(*(p.prefetch_request_data(r) for r in reqs))
    assert renderer.calls == 1 and all(produce(p, r)[0] == (1, 2, 3) for r in reqs)
    await p.render.close()


async def test_a_slow_or_failing_renderer_falls_back_to_the_estimate_within_the_timeout(renderer):
    p = vllm_producer(renderer.url, timeout="50ms", mmTimeout="50ms")
    renderer.delay = 1.0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    req = InferenceRequest("r", MODEL, MODEL, "chat", "x" * 40, {}, body=chat("slow"))
    await p.prefetch_request_data(req)
    assert loop.time() - t0 < 0.5
    assert produce(p, req) == (None, 10) and p.counts["fallback_timeout"] == 1
    renderer.delay, renderer.status = 0.0, 500
    req = InferenceRequest("r2", MODEL, MODEL, "chat", "x" * 8, {}, body=chat("broken"))
    await p.prefetch_request_data(req)
    assert produce(p, req) == (None, 2) and p.counts["fallback_error"] == 1
    await p.render.close()
    down = vllm_producer("http://127.0.0.1:9")  # nothing listens: connection refused
    await down.prefetch_request_data(req)
    assert produce(down, req) == (None, 2) and down.counts["fallback_error"] == 1
    await down.render.close()


async def test_without_the_async_step_only_cached_renders_are_used(renderer):
    p = vllm_producer(renderer.url)
    req = request(chat("explain me"))
    assert produce(p, req)[0] is None  # explain: no I/O, not cached yet
    await p.prefetch_request_data(request(chat("explain me"), rid="r9"))
    produce(p, request(chat("explain me"), rid="r9"))
    assert produce(p, req)[0] == (1, 2, 3)
    await p.render.close()


# --------------------------------------------------------------------------- the simulator
async def test_simulator_renders_and_tokenizes_with_the_same_ids_as_the_in_process_backend(tok, renderer):
    port = free_port()
    sim = SimServer(SimConfig(port=port, tokenizer=str(FIXTURE), model=MODEL))
    await sim.start(AsyncioClock(asyncio.get_running_loop(), 1.0))
    try:
        url = f"http://127.0.0.1:{port}"
        p = vllm_producer(url)
        body = chat("same ids?", max_tokens=4)
        req = request(body)
        await p.prefetch_request_data(req)
        ids, _ = produce(p, req)
        assert ids == tuple(tok.tokenize_body("chat", body)) and p.counts["rendered"] == 1
        async with aiohttp.ClientSession() as s:
            r = await (await s.post(f"{url}/v1/completions/render", json={"prompt": "plain text"})).json()
            assert r[0]["token_ids"] == tok.encode("plain text", True) and r[0]["model"] == MODEL
            t = await (await s.post(f"{url}/tokenize", json={"messages": body["messages"]})).json()
            assert t["tokens"] == list(ids) and t["count"] == len(ids)
            done = await (await s.post(f"{url}/v1/chat/completions", json=body)).json()
            assert done["usage"]["prompt_tokens"] == len(ids)
            bad = await s.post(f"{url}/v1/chat/completions/render", json={**body, "model": "nope"})
            assert bad.status == 404
        await p.render.close()
    finally:
        await sim.stop()


def test_simulator_file_tokenizer_refuses_a_bad_directory(tmp_path):
    with pytest.raises(ValueError):
        FileTokenizer(str(tmp_path))


# --------------------------------------------------------------------------- Anthropic Messages
def anthropic(user, system=SYSTEM, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 4, "system": system, "messages": [{"role": "user", "content": user}],
            **extra}


def test_messages_convert_to_chat_as_vllm_does():
    body = {"system": [{"type": "text", "text": "x-anthropic-billing-header: cch=1;"}, {"type": "text", "text": "A"},
                       {"type": "image", "source": {}}, {"type": "text", "text": ""}, {"type": "text", "text": "B"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "one"}]},
                         {"role": "assistant", "content": []},
                         {"role": "user", "content": [{"type": "text", "text": ""}]},
                         {"role": "user", "content": [{"type": "text", "text": "p"}, {"type": "text", "text": "q"}]}]}
    assert messages_to_chat(body) == [
        {"role": "system", "content": "AB"}, {"role": "user", "content": "one"}, {"role": "assistant"},
        {"role": "user", "content": [{"type": "text", "text": "p"}, {"type": "text", "text": "q"}]}]
    assert messages_to_chat({"system": "", "messages": [{"role": "user", "content": "hi"}]}) == [
        {"role": "user", "content": "hi"}]
    for bad, where in ((anthropic([{"type": "image", "source": {}}]), "messages[0].content[0]"),
                       ({"messages": [{"role": "system", "content": "s"}]}, "messages[0].role"),
                       (anthropic("q", tools=[{"name": "t"}]), "tools"),
                       (anthropic("q", system=7), "system"),
                       ({"messages": [{"role": "user", "content": []}]}, "no content"),
                       ({"messages": []}, "messages")):
        with pytest.raises(TokenizerError, match=where.replace("[", r"\[").replace("]", r"\]")):
            messages_to_chat(bad)


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                st.sampled_from(["role", "content", "type", "text", "system"]), c, max_size=4),
                            max_leaves=30)


@given(st.dictionaries(st.sampled_from(["messages", "system", "tools"]), _json_values, max_size=3)
       | st.builds(lambda m, s: {"messages": m, "system": s}, st.lists(_json_values, max_size=5), _json_values))
@settings(max_examples=300, deadline=None)
def test_hostile_messages_bodies_convert_or_raise_a_clear_error(body):
    try:
        out = messages_to_chat(body)
    except TokenizerError as e:
        assert str(e)
        return
    assert 0 < len(out) <= len(body["messages"]) + 1  # bounded by the input: one message each, plus system
    assert all(m["role"] in ("system", "user", "assistant") for m in out)


def test_in_process_backend_tokenizes_messages_as_chat_of_their_conversion(tok):
    body = anthropic([{"type": "text", "text": "Which endpoint?"}])
    converted = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which endpoint?"}]}
    assert tok.tokenize_body("messages", body) == tok.tokenize_body("chat", converted)
    p = build_plugin("token-producer", "tp", {"inProcess": {"path": str(FIXTURE)}}, PluginHandle(), "x")
    ids, n = produce(p, request(body, "messages"))
    assert ids == tuple(tok.tokenize_body("chat", converted)) and n == len(ids)
    ids, n = produce(p, request(anthropic([{"type": "image", "source": {}}]), "messages", "r2"))
    assert ids is None and p.counts["estimated"] == 1  # not convertible here: the estimate


async def test_native_and_legacy_messages_modes_post_where_the_reference_does(renderer):
    body = anthropic("q", temperature=0.5)
    native = vllm_producer(renderer.url, messagesRenderMode="native")
    req = request(body, "messages")
    req.target_model = "adapter"
    await native.prefetch_request_data(req)
    assert produce(native, req) == ((1, 2, 3), 3)
    assert renderer.seen == [(MESSAGES_RENDER_PATH, "Bearer k", {**body, "model": "adapter"})]
    legacy = vllm_producer(renderer.url, messagesRenderMode="legacy")
    req = request(body, "messages", "r2")
    req.target_model = "adapter"
    await legacy.prefetch_request_data(req)
    assert produce(legacy, req) == ((1, 2, 3), 3)
    assert renderer.seen[-1] == ("/v1/chat/completions/render", "Bearer k",
                                 {"messages": messages_to_chat(body), "model": MODEL})  # modelName, as the reference
    req = request(anthropic([{"type": "image", "source": {}}]), "messages", "r3")
    await legacy.prefetch_request_data(req)  # the conversion takes text only: the estimate, no call
    assert produce(legacy, req)[0] is None and legacy.counts["fallback_error"] == 1 and renderer.calls == 2
    for p in (native, legacy):
        await p.stop_background()


@pytest.mark.parametrize("messages_status, chat_status, mode", [
    (200, 200, "native"), (404, 200, "legacy"), (405, 200, "legacy"), (500, 200, ""), (404, 500, "")])
async def test_auto_mode_probes_once_and_picks_native_or_legacy(renderer, messages_status, chat_status, mode):
    renderer.statuses = {MESSAGES_RENDER_PATH: messages_status, "/v1/chat/completions/render": chat_status}
    p = vllm_producer(renderer.url)  # messagesRenderMode: auto, the default
    assert p.messages_mode.mode == ""
    req = request(anthropic("q"), "messages")
    await p.prefetch_request_data(req)  # unknown: the request waits for one probe, as the reference's
    probe = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "warmup"}]}
    assert renderer.seen[0] == (MESSAGES_RENDER_PATH, "Bearer k", probe)
    assert p.messages_mode.mode == mode
    ids, _ = produce(p, req)
    if mode:
        assert ids == (1, 2, 3) and p.counts["rendered"] == 1
        assert renderer.seen[-1][0] == (MESSAGES_RENDER_PATH if mode == "native" else "/v1/chat/completions/render")
        calls = renderer.calls
        req = request(anthropic("other"), "messages", "r2")
        await p.prefetch_request_data(req)
        assert renderer.calls == calls + 1 and produce(p, req)[0] == (1, 2, 3)  # no second probe
    else:  # any other outcome: unknown, the estimate for this request, a new probe next time
        assert ids is None and p.counts["fallback_error"] == 1
        renderer.statuses = {}
        req = request(anthropic("q"), "messages", "r2")
        await p.prefetch_request_data(req)
        assert p.messages_mode.mode == "native" and produce(p, req)[0] == (1, 2, 3)
    await p.stop_background()


async def test_auto_mode_probes_at_start_in_the_background(renderer, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "probe-key")
    renderer.statuses = {MESSAGES_RENDER_PATH: 404}
    p = vllm_producer(renderer.url)
    await p.start_background()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while p.messages_mode.mode == "" and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert p.messages_mode.mode == "legacy"
    assert [(path, auth) for path, auth, _ in renderer.seen] == [
        (MESSAGES_RENDER_PATH, "Bearer probe-key"), ("/v1/chat/completions/render", "Bearer probe-key")]
    await p.stop_background()
    assert p._probe_task.done()


async def test_simulator_serves_messages_with_the_in_process_backends_ids(tok):
    port = free_port()
    sim = SimServer(SimConfig(port=port, tokenizer=str(FIXTURE), model=MODEL))
    await sim.start(AsyncioClock(asyncio.get_running_loop(), 1.0))
    try:
        url = f"http://127.0.0.1:{port}"
        body = anthropic([{"type": "text", "text": "same ids?"}, {"type": "text", "text": "twice"}],
                         system=[{"type": "text", "text": SYSTEM}])
        want = tok.tokenize_body("messages", body)
        p = vllm_producer(url, messagesRenderMode="native")
        req = request(body, "messages")
        await p.prefetch_request_data(req)
        assert produce(p, req)[0] == tuple(want)
        async with aiohttp.ClientSession() as s:
            r = await (await s.post(f"{url}/v1/messages/render", json=body)).json()
            assert r["token_ids"] == want and r["model"] == MODEL
            done = await (await s.post(f"{url}/v1/messages", json=body)).json()
            assert done["type"] == "message" and done["content"][0]["type"] == "text"
            assert done["usage"]["input_tokens"] == len(want) and done["stop_reason"] == "max_tokens"
            bad = await s.post(f"{url}/v1/messages", json=anthropic([{"type": "image", "source": {}}]))
            assert bad.status == 400 and "content[0]" in (await bad.json())["error"]["message"]
            streamed = await s.post(f"{url}/v1/messages", json={**body, "stream": True})
            assert streamed.status == 400
        await p.stop_background()
    finally:
        await sim.stop()
