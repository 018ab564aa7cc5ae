"""P/D disaggregation over real HTTP on 127.0.0.1: a decode server given
`x-prefiller-host-port` acts as llm-d's routing sidecar (prefill leg to the prefill server,
then a local decode with the prompt's KV pulled, not recomputed); the prefill server
answers vLLM's kv_transfer_params and frees its blocks when the decoder has read them;
prefiller down or failing -> local prefill, no failed request; `epp sim --roles/--hardware`
serves a mixed pool from one process."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.launch import free_port
from devstack.localstack import start_sims
from simulator.cli import build_parser, configs_from_args
from simulator.engine import EngineConfig
from simulator.server import SimConfig, SimServer

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BPT = 2 * 32 * 8 * 128 * 2  # KV bytes per token (Llama-3.1-8B, bf16)
N = 3000  # a long prompt


def ids(n: int, seed: int = 1) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 + 10 for i in range(n)]


async def metrics(s: aiohttp.ClientSession, port: int) -> dict:
    async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fam: dict, name: str, sample: str | None = None, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    if name not in fam:
        return 0.0
    return sum(s.value for s in fam[name].samples
               if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()))


def total(fam: dict, name: str, **labels) -> float:
    return value(fam, name, name + "_total", **labels)


async def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def start(**kw) -> SimServer:
    server = SimServer(SimConfig(model=MODEL, port=free_port(), time_scale=20, **kw))
    await server.start()
    return server


@pytest.fixture
async def pd():
    """A prefill server, a decode server and a client session; all stopped after."""
    servers = [await start(pod="p", role="prefill"), await start(pod="d", role="decode")]
    session = aiohttp.ClientSession()
    try:
        yield servers[0], servers[1], session
    finally:
        await session.close()
        for s in servers:
            await s.stop()


def header(server: SimServer) -> dict[str, str]:
    return {"x-prefiller-host-port": f"127.0.0.1:{server.config.port}"}


async def post(s: aiohttp.ClientSession, server: SimServer, path: str, body: dict,
               headers: dict | None = None) -> tuple[int, dict]:
    async with s.post(f"http://127.0.0.1:{server.config.port}{path}", json=body, headers=headers or {}) as r:
        return r.status, await r.json()


async def held(s: aiohttp.ClientSession, server: SimServer) -> float:
    return value(await metrics(s, server.config.port), "sim_kv_transfers_held")


async def test_long_prompt_is_prefilled_on_the_prefill_server_and_decoded_on_the_decode_server(pd):
    p, d, s = pd
    body = {"model": MODEL, "prompt": ids(N), "max_tokens": 20}
    status, out = await post(s, d, "/v1/completions", body, header(p))
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == N and out["usage"]["completion_tokens"] == 20
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["kv_transfer_params"] is None  # the decoder's vLLM answer, passed through by the sidecar

    fp, fd = await metrics(s, p.config.port), await metrics(s, d.config.port)
    # The prefill server prefilled the whole prompt for a remote decoder and made one token.
    assert total(fp, "sim_requests", role="prefill") == 1 and total(fp, "sim_requests", role="both") == 0
    assert total(fp, "sim_remote_decode_prefills") == 1
    assert total(fp, "vllm:prompt_tokens_by_source", source="local_compute") == N
    assert total(fp, "vllm:generation_tokens") == 1
    # The decode server pulled the prompt's KV and computed one prompt token, not N.
    assert total(fd, "sim_requests", role="decode") == 1 and total(fd, "sim_requests", role="both") == 0
    assert total(fd, "sim_remote_prefills") == 1
    assert total(fd, "sim_kv_bytes_transferred") == N * BPT
    assert total(fd, "vllm:prompt_tokens_by_source", source="local_compute") == 1
    assert total(fd, "vllm:prompt_tokens_by_source", source="external_kv_transfer") == N - 1
    assert total(fd, "vllm:generation_tokens") == 20
    assert value(fd, "vllm:nixl_bytes_transferred", "vllm:nixl_bytes_transferred_sum") == N * BPT
    assert value(fd, "vllm:nixl_xfer_time_seconds", "vllm:nixl_xfer_time_seconds_count") == 1
    assert "sim_pd_local_fallbacks" not in fd
    # The decoder's NIXL notification freed the prefill server's blocks (no expiry).
    await eventually(lambda: _zero(held(s, p)))
    fp = await metrics(s, p.config.port)
    assert value(fp, "vllm:kv_cache_usage_perc") == 0 and total(fp, "vllm:nixl_num_kv_expired_reqs") == 0

    # The text is the one an aggregated server with the same seed produces for the prompt.
    status, agg = await post(s, d, "/v1/completions", body)
    assert status == 200 and agg["choices"][0]["text"] == out["choices"][0]["text"]


async def _zero(awaitable) -> bool:
    return await awaitable == 0


async def test_streamed_chat_through_the_sidecar_is_intact(pd):
    p, d, s = pd
    text = " ".join(f"word{i}" for i in range(1500))
    messages = [{"role": "user", "content": text}]
    status, tok = await post(s, d, "/tokenize", {"messages": messages})
    n = tok["count"]
    body = {"model": MODEL, "messages": messages, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    async with s.post(f"http://127.0.0.1:{d.config.port}/v1/chat/completions", json=body, headers=header(p)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"]]
    assert len(deltas) == 12 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == n and usage["completion_tokens"] == 12
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # the prefiller's, as the sidecar reports

    fp, fd = await metrics(s, p.config.port), await metrics(s, d.config.port)
    assert total(fp, "sim_remote_decode_prefills") == 1
    assert total(fp, "vllm:prompt_tokens_by_source", source="local_compute") == n
    assert total(fd, "sim_remote_prefills") == 1
    assert total(fd, "vllm:prompt_tokens_by_source", source="local_compute") == 1

    # Same text as the aggregated JSON answer of the same server.
    status, agg = await post(s, d, "/v1/chat/completions", {**body, "stream": False})
    assert status == 200 and agg["choices"][0]["message"]["content"] == "".join(deltas)


async def test_prefiller_down_falls_back_to_local_prefill_without_error(pd):
    p, d, s = pd
    dead = free_port()  # nothing listens there
    status, out = await post(s, d, "/v1/completions", {"prompt": ids(N), "max_tokens": 5},
                             {"x-prefiller-host-port": f"127.0.0.1:{dead}"})
    assert status == 200 and out["usage"]["completion_tokens"] == 5
    fd = await metrics(s, d.config.port)
    assert total(fd, "sim_pd_local_fallbacks", reason="prefiller_unreachable") == 1
    assert total(fd, "vllm:prompt_tokens_by_source", source="local_compute") == N  # computed here
    assert total(fd, "sim_requests", role="both") == 1 and total(fd, "sim_remote_prefills") == 0
    assert total(await metrics(s, p.config.port), "sim_requests", role="prefill") == 0


async def test_prefiller_error_and_malformed_target_fall_back(pd):
    p, d, s = pd
    failing = await start(pod="f", role="prefill", failure_injection_rate=1.0, failure_types=["server_error"])
    try:
        status, out = await post(s, d, "/v1/completions", {"prompt": ids(500), "max_tokens": 3}, header(failing))
        assert status == 200 and out["usage"]["completion_tokens"] == 3
        status, _ = await post(s, d, "/v1/completions", {"prompt": ids(500), "max_tokens": 3},
                               {"x-prefiller-host-port": "not a host:port/x"})
        assert status == 200
        fd = await metrics(s, d.config.port)
        assert total(fd, "sim_pd_local_fallbacks", reason="prefiller_error") == 1
        assert total(fd, "sim_pd_local_fallbacks", reason="invalid_prefiller") == 1
        assert total(fd, "sim_requests", role="both") == 2
    finally:
        await failing.stop()


async def test_newer_header_name_and_comma_list_use_the_first_prefiller(pd):
    p, d, s = pd
    dead = free_port()
    hdr = {"x-llm-d-prefiller-host-port": f"127.0.0.1:{p.config.port}, 127.0.0.1:{dead}"}
    status, _ = await post(s, d, "/v1/completions", {"prompt": ids(800), "max_tokens": 2}, hdr)
    assert status == 200
    assert total(await metrics(s, d.config.port), "sim_remote_prefills") == 1


async def test_sidecarless_kv_transfer_params_round_trip(pd):
    p, d, s = pd
    prompt = ids(1200, seed=4)
    status, first = await post(s, p, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None}})
    assert status == 200 and first["usage"]["completion_tokens"] == 1
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == p.engine_id and params["remote_request_id"] == first["id"]
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == p.config.port
    assert params["tp_size"] == 1 and len(params["remote_block_ids"]) == -(-1200 // 16)
    assert await held(s, p) == 1

    status, out = await post(s, d, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "kv_transfer_params": params})
    assert status == 200 and out["usage"]["completion_tokens"] == 4
    assert out["kv_transfer_params"] is None  # vLLM: a decode request returns no params
    fd = await metrics(s, d.config.port)
    assert total(fd, "sim_remote_prefills") == 1 and total(fd, "sim_kv_bytes_transferred") == 1200 * BPT
    await eventually(lambda: _zero(held(s, p)))

    # Hostile or incomplete params: a 400 for a non-object, a local prefill for missing fields.
    status, err = await post(s, d, "/v1/completions", {"prompt": prompt, "kv_transfer_params": [1]})
    assert status == 400 and err["error"]["param"] == "kv_transfer_params"
    status, _ = await post(s, d, "/v1/completions", {"prompt": ids(300), "max_tokens": 2,
                                                     "kv_transfer_params": {"do_remote_prefill": True}})
    assert status == 200
    fd = await metrics(s, d.config.port)
    assert total(fd, "sim_pd_local_fallbacks", reason="invalid_kv_transfer_params") == 1
    assert total(fd, "sim_remote_prefills") == 1


async def test_a_prefill_server_has_no_sidecar(pd):
    p, d, s = pd
    status, _ = await post(s, p, "/v1/completions", {"prompt": ids(600), "max_tokens": 2}, header(d))
    assert status == 200
    fp = await metrics(s, p.config.port)
    assert total(fp, "sim_requests", role="both") == 1 and total(fp, "sim_remote_decode_prefills") == 0
    assert total(await metrics(s, d.config.port), "sim_requests") == 0


def test_roles_and_hardware_per_replica_flags():
    args = build_parser().parse_args(["--replicas", "3", "--roles", "prefill,decode,decode",
                                      "--hardware", "h100,a100,a100", "--labels", "tier=gold"])
    cfgs = configs_from_args(args)
    assert [c.role for c in cfgs] == ["prefill", "decode", "decode"]
    assert [c.hardware for c in cfgs] == ["h100", "a100", "a100"]
    assert cfgs[0].labels == {"llm-d.ai/role": "prefill", "llm-d.ai/accelerator-vendor": "nvidia",
                              "llm-d.ai/accelerator-variant": "h100",
                              "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "tier": "gold"}
    assert cfgs[1].labels["llm-d.ai/accelerator-variant"] == "a100"
    assert cfgs[0].engine.step_overhead < cfgs[1].engine.step_overhead
    assert cfgs[1].engine.kv_transfer_bandwidth == 20e9
    # One value applies to every replica; explicit timings win over the preset.
    (one, two) = configs_from_args(build_parser().parse_args(
        ["--replicas", "2", "--hardware", "a100", "--step-overhead", "0.002", "--kv-transfer-bandwidth", "1e9"]))
    assert one.engine.step_overhead == two.engine.step_overhead == 0.002 and two.engine.kv_transfer_bandwidth == 1e9
    assert one.role == "both" and "llm-d.ai/role" not in one.labels
    # Defaults are unchanged: no P/D or hardware labels, the H100 timings.
    (plain,) = configs_from_args(build_parser().parse_args([]))
    assert plain.labels == {} and plain.hardware is None and plain.engine.step_overhead == 0.006
    for bad in (["--replicas", "3", "--roles", "prefill,decode"], ["--role", "encoder"], ["--hardware", "tpu"]):
        with pytest.raises(ValueError):
            configs_from_args(build_parser().parse_args(bad))


def test_epp_sim_process_serves_a_mixed_pd_pool(tmp_path):
    sims = start_sims(2, model=MODEL, time_scale=20, log_dir=tmp_path,
                      flags=["--roles", "prefill,decode", "--hardware", "h100,a100"])
    try:
        import urllib.request

        def get_json(url: str) -> dict:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
                return json.loads(r.read())

        info = [get_json(sims.url(i) + "/sim/info") for i in range(2)]
        assert [i["role"] for i in info] == ["prefill", "decode"]
        assert [i["labels"]["llm-d.ai/accelerator-variant"] for i in info] == ["h100", "a100"]
        req = urllib.request.Request(
            sims.url(1) + "/v1/completions", data=json.dumps({"prompt": ids(2000), "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json",
                     "x-prefiller-host-port": sims.url(0).removeprefix("http://")})
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback
            out = json.loads(r.read())
        assert out["usage"] == {**out["usage"], "prompt_tokens": 2000, "completion_tokens": 4}
        fams = [{f.name: f for f in text_string_to_metric_families(sims.metrics(i))} for i in range(2)]
        assert total(fams[0], "sim_remote_decode_prefills") == 1 and total(fams[1], "sim_remote_prefills") == 1
        assert value(fams[0], "sim_hardware_info", hardware="h100") == 1
        assert value(fams[1], "sim_hardware_info", hardware="a100") == 1
        assert total(fams[1], "vllm:prompt_tokens_by_source", source="local_compute") == 1
    finally:
        sims.stop()


async def test_a_decode_request_dropped_while_pulling_kv_frees_the_prefillers_blocks(pd):
    p, _, s = pd
    slow = await start(pod="slow", role="decode",
                       engine=EngineConfig(kv_transfer_bandwidth=1e6))  # ~400 simulated s for the prompt
    try:
        url = f"http://127.0.0.1:{slow.config.port}/v1/completions"
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(url, json={"prompt": ids(N), "max_tokens": 4}, headers=header(p),
                              timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                await r.read()
        # The prefill server held the blocks, then the dropped decoder told it to free them.
        assert total(await metrics(s, p.config.port), "sim_remote_decode_prefills") == 1
        await eventually(lambda: _zero(held(s, p)))
        fs = await metrics(s, slow.config.port)
        assert total(fs, "sim_remote_prefills") == 0 and value(fs, "vllm:kv_cache_usage_perc") == 0
        assert total(await metrics(s, p.config.port), "vllm:nixl_num_kv_expired_reqs") == 0
    finally:
        await slow.stop()
