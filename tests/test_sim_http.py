"""`epp sim` over real HTTP on 127.0.0.1: the OpenAI client, SSE framing, errors, /metrics,
LoRA endpoints, failure injection, start-up delay, hang and die, KV events over ZMQ."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import msgpack
import openai
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from devstack.launch import Process, free_port, wait_until
from devstack.localstack import SimServers, start_sims
from simulator.tokenizer import apply_chat_template, encode

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# Every name of the reference (model-servers.md) and the extra series of a real vLLM page.
REFERENCE_NAMES = {
    "gauge": ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:lora_requests_info", "vllm:cache_config_info", "vllm:gpu_cache_usage_perc"],
    "counter": ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_hits",
                "vllm:prefix_cache_queries", "vllm:request_success", "vllm:num_preemptions"],
    "histogram": ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                  "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                  "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                  "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:iteration_tokens_total",
                  "vllm:request_params_n", "vllm:request_params_max_tokens",
                  "vllm:request_max_num_generation_tokens"],
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = start_sims(2, model=MODEL, time_scale=5, log_dir=tmp_path_factory.mktemp("sim"), kv_events=True,
                   flags=["--pod-names", "alpha,beta", "--labels", "tier=gold", "--replica-labels", "1:zone=b",
                          "--lora-modules", "sql-lora", "--max-loras", "2", "--max-model-len", "4096"])
    try:
        yield s
    finally:
        s.stop()


def post(url: str, body: dict | bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(url: str) -> dict:
    """name -> family, parsed by prometheus_client's own parser."""
    _, body = get(url + "/metrics")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict, name: str, sample_name: str | None = None, **labels) -> float:
    for s in families[name].samples:
        if s.name == (sample_name or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample_name or name} {labels}")


def client(sim: SimServers, replica: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url(replica) + "/v1", api_key="unused", max_retries=0, timeout=20)


SYSTEM = ("You are a meticulous assistant for a logistics company. Answer questions about shipments, "
          "warehouses and delivery schedules precisely, cite the order number, and never invent data. ") * 8


def test_openai_client_streams_chat_with_usage_and_cached_tokens(sim):
    c = client(sim)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is order 1?"}]
    first = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7)
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 7
    assert first.usage.prompt_tokens == len(encode(apply_chat_template(msgs)))
    msgs2 = [msgs[0], {"role": "user", "content": "And order 2?"}]
    stream = c.chat.completions.create(model=MODEL, messages=msgs2, max_completion_tokens=9, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(encode(text)) == 9
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 9
    shared = len(encode(apply_chat_template([msgs[0]])))
    assert usage.prompt_tokens_details.cached_tokens == shared // 16 * 16 > 0


def test_openai_client_completions_stream_and_json(sim):
    c = client(sim, 1)
    r = c.completions.create(model=MODEL, prompt="Tell me about the sea", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(c.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4, stream=True,
                                       stream_options={"include_usage": True}))
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.total_tokens == 8
    # same seed and prompt -> same text (deterministic output)
    again = c.completions.create(model=MODEL, prompt="Tell me about the sea", max_tokens=5)
    assert again.choices[0].text == r.choices[0].text


def test_sse_framing_is_byte_exact(sim):
    status, body = post(sim.url() + "/v1/completions", {"model": MODEL, "prompt": "hi there", "max_tokens": 3,
                                                         "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b""
    events = events[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert len(payloads) == 4 and payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    # without include_usage: no usage chunk
    _, body = post(sim.url() + "/v1/completions", {"model": MODEL, "prompt": "hi there", "max_tokens": 2, "stream": True})
    assert body.count(b"data: ") == 3 and b"usage" not in body


def test_errors_have_status_and_openai_shape(sim):
    c = client(sim)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.status_code == 404 and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096"):
        c.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=1)
    cases = [
        (b"{not json", 400, None),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages"),
        ({"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**8}, 400, "prompt"),  # rejected before any work
    ]
    for body, status, param in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        got, raw = post(sim.url() + path, body)
        err = json.loads(raw)["error"]
        assert (got, err["code"], err["param"]) == (status, status, param), raw
        assert err["type"] == "BadRequestError" and err["message"]
    # the server is still fine afterwards and leaked nothing
    assert c.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1
    assert sample(metrics(sim.url()), "vllm:num_requests_running") == 0


def test_metrics_parse_and_carry_every_reference_name(sim):
    before = metrics(sim.url())
    c = client(sim)
    c.completions.create(model=MODEL, prompt="count me " * 40, max_tokens=3)
    c.completions.create(model=MODEL, prompt="count me " * 40 + "again", max_tokens=3)
    fam = metrics(sim.url())
    for type_, names in REFERENCE_NAMES.items():
        for name in names:
            assert fam[name].type == type_, name
            if type_ != "gauge":
                assert name + "_created" in fam, name
    assert any(n.startswith("python_gc_") for n in fam) and any(n.startswith("process_") for n in fam)
    cache = fam["vllm:cache_config_info"].samples[0]
    assert cache.labels["block_size"] == "16" and cache.labels["num_gpu_blocks"] == "27000" and cache.value == 1
    lora = fam["vllm:lora_requests_info"].samples[0]
    assert lora.labels["max_lora"] == "2" and lora.value > 1.7e9

    def delta(name, **labels):
        return sample(fam, name, name + "_total", **labels) - sample(before, name, name + "_total", **labels)

    assert delta("vllm:request_success", finish_reason="length", model_name=MODEL) == 2
    assert delta("vllm:generation_tokens") == 6
    assert delta("vllm:prefix_cache_hits") >= 64
    assert delta("sim_requests", pod="alpha") == 2
    assert delta("sim_prefix_cache_hit_requests", pod="alpha") == 1
    ttft = fam["vllm:time_to_first_token_seconds"]
    count = [s.value for s in ttft.samples if s.name.endswith("_count")][0]
    assert count >= 2


def test_lora_adapters_load_list_serve_and_unload(sim):
    url = sim.url(1)
    c = client(sim, 1)
    assert [m.id for m in c.models.list().data] == [MODEL, "sql-lora"]
    status, _ = post(url + "/v1/load_lora_adapter", {"lora_name": "chat-lora", "lora_path": "/adapters/chat"})
    assert status == 200
    status, raw = post(url + "/v1/load_lora_adapter", {"lora_name": "chat-lora", "lora_path": "/adapters/chat"})
    assert status == 400 and "already been loaded" in json.loads(raw)["error"]["message"]
    assert [m.id for m in c.models.list().data] == [MODEL, "sql-lora", "chat-lora"]
    r = c.completions.create(model="chat-lora", prompt="hello", max_tokens=2)
    assert r.model == "chat-lora" and r.usage.completion_tokens == 2
    assert post(url + "/v1/unload_lora_adapter", {"lora_name": "chat-lora"})[0] == 200
    assert post(url + "/v1/unload_lora_adapter", {"lora_name": "chat-lora"})[0] == 404
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="chat-lora", prompt="hello", max_tokens=2)
    loads = sample(metrics(url), "sim_lora_loads", "sim_lora_loads_total")
    assert loads >= 1


def test_tokenize_and_replica_identity(sim):
    status, raw = post(sim.url() + "/tokenize", {"model": MODEL, "prompt": "Hello simulated world"})
    assert status == 200 and json.loads(raw)["tokens"] == encode("Hello simulated world")
    msgs = [{"role": "user", "content": "hi"}]
    _, raw = post(sim.url() + "/tokenize", {"model": MODEL, "messages": msgs})
    assert json.loads(raw)["count"] == len(encode(apply_chat_template(msgs)))
    infos = [json.loads(get(sim.url(i) + "/sim/info")[1]) for i in (0, 1)]
    assert [i["pod"] for i in infos] == ["alpha", "beta"]
    assert infos[0]["labels"] == {"tier": "gold"} and infos[1]["labels"] == {"tier": "gold", "zone": "b"}
    log = sim.process.log_path.read_text()
    assert f"pod=alpha model={MODEL} url={sim.url(0)}" in log and f"pod=beta model={MODEL} url={sim.url(1)}" in log


def test_kv_events_over_zmq_are_the_blocks_the_server_stored(sim):
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{sim.kv_port}")
    try:
        def recv(timeout_ms: int) -> list | None:
            if not sub.poll(timeout_ms):
                return None
            frames = sub.recv_multipart()
            assert len(frames) == 3 and len(frames[1]) == 8
            assert frames[0] == f"kv@127.0.0.1:{sim.base_port}@{MODEL}".encode()
            return msgpack.unpackb(frames[2])

        # PUB/SUB joins asynchronously: send until a first event arrives
        deadline = time.monotonic() + 15
        n = 0
        while recv(200) is None:
            assert time.monotonic() < deadline, "no KV event received"
            post(sim.url() + "/v1/completions", {"model": MODEL, "prompt": f"warm up {n} " * 20, "max_tokens": 1})
            n += 1
        while recv(200) is not None:
            pass
        prompt = "A fresh prompt about lighthouses and their keepers, " * 6
        post(sim.url() + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})
        ids = encode(prompt)
        full = len(ids) // 16
        stored = []
        while sum(len(e["block_hashes"]) for e in stored) < full:
            batch = recv(10_000)
            assert batch is not None, f"only {stored} stored"
            assert isinstance(batch["ts"], float) and batch["data_parallel_rank"] == 0  # vLLM's map encoding
            stored += [e for e in batch["events"] if e["type"] == "BlockStored"]
        assert [t for e in stored for t in e["token_ids"]] == ids[: full * 16]
        assert sum(len(e["block_hashes"]) for e in stored) == full and stored[0]["parent_block_hash"] is None
        assert all(e["block_size"] == 16 and e["medium"] == "GPU" and e["group_idx"] == 0 for e in stored)
    finally:
        sub.close()


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    s = start_sims(2, model=MODEL, log_dir=tmp_path_factory.mktemp("flaky"), name="flaky", healthy=False,
                   flags=["--failure-injection-rate", "1", "--failure-types", "rate_limit,server_error",
                          "--startup-delay", "3"])
    try:
        yield s
    finally:
        s.stop()


def test_startup_delay_then_injected_failures(flaky):
    assert get(flaky.url() + "/health")[0] == 503
    wait_until(lambda: get(flaky.url() + "/health")[0] == 200, 20, "health after the start-up delay")
    codes = set()
    for _ in range(12):
        status, raw = post(flaky.url() + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        err = json.loads(raw)["error"]
        assert err["code"] == status and err["type"] in ("RateLimitError", "ServiceUnavailableError")
        codes.add(status)
    assert codes == {429, 503}
    fam = metrics(flaky.url())
    assert sample(fam, "sim_requests_rejected", "sim_requests_rejected_total", code="429") >= 1
    with pytest.raises(openai.RateLimitError):
        for _ in range(20):
            try:
                client(flaky).completions.create(model=MODEL, prompt="x", max_tokens=1)
            except openai.InternalServerError:
                continue


def test_hang_then_die_one_replica(flaky):
    url = flaky.url(1)
    wait_until(lambda: get(url + "/health")[0] == 200, 20, "replica 1 health")
    assert post(url + "/sim/hang", {})[0] == 200
    with pytest.raises(OSError):  # timeout: the server accepts but never answers
        urllib.request.urlopen(url + "/health", timeout=0.5)  # noqa: S310
    assert get(flaky.url(0) + "/health")[0] == 200  # the other replica is unaffected
    assert post(url + "/sim/unhang", {})[0] == 200
    assert get(url + "/health")[0] == 200
    assert post(url + "/sim/die", {})[0] == 200
    wait_until(lambda: _refused(url + "/health"), 10, "replica 1 to close its port")
    assert get(flaky.url(0) + "/health")[0] == 200 and flaky.process.alive()


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)  # noqa: S310
    except urllib.error.URLError as e:
        return isinstance(e.reason, ConnectionRefusedError)
    return False


def test_bad_flags_exit_with_a_message(tmp_path):
    port = free_port()
    log = tmp_path / "bad.log"
    p = Process([sys.executable, "-m", "epp.cli", "sim", "--port", str(port), "--replicas", "2",
                 "--pod-names", "only-one"], "bad", log_path=log)
    try:
        wait_until(lambda: not p.alive(), 20, "bad sim to exit")
        assert p.proc.returncode == 2 and "--pod-names has 1 names for 2 replicas" in log.read_text()
    finally:
        p.stop()


def test_client_disconnect_aborts_the_request_and_frees_its_slot(sim):
    import socket
    url = sim.url(1)
    body = json.dumps({"model": MODEL, "prompt": "a long story " * 30, "max_tokens": 3000, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", sim.base_port + 1), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:  # streaming has started
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        wait_until(lambda: sample(metrics(url), "vllm:num_requests_running") == 1, 10, "the request running")
    wait_until(lambda: sample(metrics(url), "vllm:num_requests_running") == 0, 10, "the aborted request to leave")
    fam = metrics(url)
    assert sample(fam, "vllm:request_success", "vllm:request_success_total", finish_reason="abort") >= 1
    assert sample(fam, "vllm:kv_cache_usage_perc") == 0


async def test_echo_mode_repeats_the_prompt_in_process():
    import aiohttp

    from simulator.server import SimConfig, SimServer
    server = SimServer(SimConfig(model="m", port=free_port(), mode="echo", time_scale=10))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{server.config.port}/v1/completions"
            async with s.post(url, json={"prompt": "Echo these words back", "max_tokens": 50}) as r:
                body = await r.json()
            assert body["choices"][0] == {**body["choices"][0], "text": "Echo these words back", "finish_reason": "stop"}
            async with s.post(url, json={"prompt": "Echo these words back", "max_tokens": 2}) as r:
                body = await r.json()
            assert body["choices"][0]["text"] == "Echo these" and body["choices"][0]["finish_reason"] == "length"
    finally:
        await server.stop()
