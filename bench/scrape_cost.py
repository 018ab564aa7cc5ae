"""CPU cost of scraping one model server's /metrics page, as the picker does it.

    .venv/bin/python -m bench.scrape_cost [--size-kb 40] [--scrapes 2000]

Prints (1) the extraction cost alone (parse_metrics on a realistic vLLM page) and
(2) the picker-side CPU of a full scrape over HTTP (aiohttp client + extraction),
measured with thread CPU time while the page is served by a separate process, and
the resulting CPU share at 8 endpoints every 50 ms; (3) for comparison, the same
scrape through a bare asyncio protocol instead of aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from epp.launch import Process, free_port, port_open, python_module_argv, wait_until

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", _TTFT_BUCKETS),
    ("vllm:inter_token_latency_seconds", _TTFT_BUCKETS),
    ("vllm:time_per_output_token_seconds", _TTFT_BUCKETS),
    ("vllm:e2e_request_latency_seconds", _LATENCY_BUCKETS),
    ("vllm:request_queue_time_seconds", _LATENCY_BUCKETS),
    ("vllm:request_inference_time_seconds", _LATENCY_BUCKETS),
    ("vllm:request_prefill_time_seconds", _LATENCY_BUCKETS),
    ("vllm:request_decode_time_seconds", _LATENCY_BUCKETS),
    ("vllm:request_prompt_tokens", _TOKEN_BUCKETS),
    ("vllm:request_generation_tokens", _TOKEN_BUCKETS),
    ("vllm:iteration_tokens_total", _TOKEN_BUCKETS),
    ("vllm:request_params_n", (1, 2, 5, 10, 20)),
    ("vllm:request_params_max_tokens", _TOKEN_BUCKETS),
    ("vllm:request_max_num_generation_tokens", _TOKEN_BUCKETS),
)
_CACHE_LABELS = {
    "block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False", "cpu_offload_gb": "0",
    "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9", "is_attention_free": "False",
    "num_cpu_blocks": "None", "num_gpu_blocks": "27400", "num_gpu_blocks_override": "None",
    "prefix_caching_hash_algo": "sha256", "sliding_window": "None", "swap_space": "4",
    "swap_space_bytes": "4294967296", "kv_sharing_fast_prefill": "False",
}


def _labels(pairs: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in pairs.items())


def realistic_vllm_page(
    *,
    waiting: int = 3,
    running: int = 7,
    kv: float = 0.42,
    models: tuple[str, ...] = ("meta-llama/Llama-3.1-8B-Instruct",),
    lora: tuple[tuple[float, str, str, int], ...] = ((1.7e9, "", "", 4),),
    block_size: int = 16,
    num_gpu_blocks: int = 27400,
    target_kb: int = 40,
    seed: int = 1,
    kv_alias: bool = True,
) -> bytes:
    """A /metrics page shaped like vLLM v0.10+ (see reference model-servers.md): Python
    runtime series first, every counter/histogram with a `_created` sibling, many
    histogram buckets, `vllm:gpu_cache_usage_perc` beside `vllm:kv_cache_usage_perc`,
    and `vllm:cache_config_info` with many labels in shuffled order. `lora` holds
    (timestamp, running, waiting, max_lora) per vllm:lora_requests_info series.
    Histograms are repeated per engine rank until the page reaches `target_kb`."""
    rng = random.Random(seed)
    out: list[str] = []
    add = out.append
    for gen in range(3):
        add(f'python_gc_objects_collected_total{{generation="{gen}"}} {rng.randint(100, 90000)}.0')
    add("# HELP python_info Python platform information\n# TYPE python_info gauge")
    add('python_info{implementation="CPython",major="3",minor="12",patchlevel="3",version="3.12.3"} 1.0')
    for name in ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_cpu_seconds_total", "process_open_fds", "process_max_fds"):
        add(f"# HELP {name} Process metric.\n# TYPE {name} gauge\n{name} {rng.uniform(1, 1e10):.6e}")
    cache_items = list({**_CACHE_LABELS, "block_size": str(block_size),
                        "num_gpu_blocks": str(num_gpu_blocks)}.items())
    rng.shuffle(cache_items)
    add("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        "# TYPE vllm:cache_config_info gauge")
    add(f"vllm:cache_config_info{{{_labels(dict(cache_items))}}} 1.0")
    gauges = [("vllm:num_requests_running", running), ("vllm:num_requests_waiting", waiting),
              ("vllm:kv_cache_usage_perc", kv)]
    if kv_alias:
        gauges.append(("vllm:gpu_cache_usage_perc", kv))
    add("# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge")
    for ts, run, wait, max_lora in lora:
        pairs = [("max_lora", str(max_lora)), ("running_lora_adapters", run), ("waiting_lora_adapters", wait)]
        rng.shuffle(pairs)
        add(f"vllm:lora_requests_info{{{_labels(dict(pairs))}}} {ts}")
    def share(value: int, index: int) -> int:
        return value // len(models) + (1 if index < value % len(models) else 0)

    for name, value in gauges:
        add(f"# HELP {name} Gauge.\n# TYPE {name} gauge")
        for index, model in enumerate(models):
            shown = share(value, index) if isinstance(value, int) else value
            add(f'{name}{{engine="0",model_name="{model}"}} {float(shown)}')
    for name in ("vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        add(f"# HELP {name}_total Counter.\n# TYPE {name}_total counter")
        for model in models:
            add(f'{name}_total{{engine="0",model_name="{model}"}} {float(rng.randint(0, 10**7))}')
            add(f'{name}_created{{engine="0",model_name="{model}"}} 1.7e9')
    add("# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter")
    for model in models:
        for reason in ("stop", "length", "abort"):
            base = f'engine="0",finished_reason="{reason}",model_name="{model}"'
            add(f"vllm:request_success_total{{{base}}} {float(rng.randint(0, 10**5))}")
            add(f"vllm:request_success_created{{{base}}} 1.7e9")
    # Histogram families, repeated under numbered names (as vLLM's per-rank and speculative
    # decoding series add more) until the page has the wanted size.
    size, rank = sum(len(s) + 1 for s in out), 0
    while size < target_kb * 1024:
        for name, buckets in _HISTOGRAMS:
            family = name if rank == 0 else f"{name}_{rank}"
            lines = [f"# HELP {family} Histogram.", f"# TYPE {family} histogram"]
            for model in models:
                base = f'engine="0",model_name="{model}"'
                count = 0
                for le in buckets:
                    count += rng.randint(0, 500)
                    lines.append(f'{family}_bucket{{{base},le="{float(le)}"}} {float(count)}')
                lines.append(f'{family}_bucket{{{base},le="+Inf"}} {float(count)}')
                lines.append(f"{family}_count{{{base}}} {float(count)}")
                lines.append(f"{family}_sum{{{base}}} {rng.uniform(0, 1e6)}")
                lines.append(f"{family}_created{{{base}}} 1.7e9")
            out.extend(lines)
            size += sum(len(s) + 1 for s in lines)
            if size >= target_kb * 1024:
                break
        rank += 1
    return ("\n".join(out) + "\n").encode()


# ---------------------------------------------------------------------------- serving
def _serve(port: int, size_kb: int) -> None:
    from aiohttp import web

    page = realistic_vllm_page(target_kb=size_kb)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---------------------------------------------------------------------------- measuring
def _extract_cost(page: bytes, n: int) -> float:
    from epp.datalayer import DEFAULT_SPECS, parse_metrics

    spec = DEFAULT_SPECS["vllm"]
    for _ in range(200):
        parse_metrics(page, spec, 1.0)
    t0 = time.thread_time()
    for _ in range(n):
        parse_metrics(page, spec, 1.0)
    return (time.thread_time() - t0) / n


async def _scrape_cost(port: int, n: int) -> tuple[float, float, int]:
    from epp.datalayer import MetricsCollector
    from epp.datastore import Datastore, EndpointSpec

    ds = Datastore()
    ep = ds.upsert(EndpointSpec(name="bench", address="127.0.0.1", port=port))
    # Drive the collector's own scrape routine back to back (no sleeping), so the thread's
    # CPU time is exactly scraping: HTTP request and response handling plus extraction.
    collector = MetricsCollector(ds, interval=3600.0)
    await collector.start()
    try:
        url, stats = collector._url(ep), collector.stats(ep)
        for _ in range(100):
            await collector._scrape_once(ep, url, stats)
        ok0 = stats.ok
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            await collector._scrape_once(ep, url, stats)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        if stats.ok - ok0 != n or not ep.metrics.ok or ep.metrics.num_gpu_blocks != 27400:
            raise RuntimeError(f"scrapes failed: {stats}")
        return cpu / n, wall / n, len(await _fetch(collector, url))
    finally:
        await collector.stop()


class _RawClient(asyncio.Protocol):
    """For comparison only: the least a keep-alive HTTP/1.1 GET can cost in asyncio
    (Content-Length responses only). Not used by the picker."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.need = -1
        self.head = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.buf[:i]).lower()
            j = head.index(b"content-length:") + 15
            k = head.find(b"\r\n", j)
            self.head, self.need = i + 4, i + 4 + int(head[j:k if k > 0 else None])
        if len(self.buf) >= self.need and self.waiter is not None:
            body = bytes(self.buf[self.head:self.need])
            del self.buf[:self.need]
            self.need = -1
            self.waiter.set_result(body)


async def _raw_cost(port: int, n: int) -> float:
    from epp.datalayer import DEFAULT_SPECS, parse_metrics

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_RawClient, "127.0.0.1", port)
    request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept-Encoding: identity\r\n\r\n".encode()

    async def once() -> None:
        proto.waiter = loop.create_future()
        transport.write(request)
        parse_metrics(await proto.waiter, DEFAULT_SPECS["vllm"], 1.0)

    for _ in range(100):
        await once()
    c0 = time.thread_time()
    for _ in range(n):
        await once()
    transport.close()
    return (time.thread_time() - c0) / n


async def _fetch(collector, url: str) -> bytes:
    async with collector._session.get(url) as resp:
        return await resp.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape_cost")
    p.add_argument("--size-kb", type=int, default=40)
    p.add_argument("--scrapes", type=int, default=2000)
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.size_kb)
        return 0
    page = realistic_vllm_page(target_kb=args.size_kb)
    per_extract = _extract_cost(page, args.scrapes)
    port = free_port()
    server = Process(python_module_argv("bench.scrape_cost", "--serve", str(port), "--size-kb", str(args.size_kb)),
                     name="metrics-server")
    try:
        wait_until(lambda: port_open(port), 15, "bench metrics server")
        cpu, wall, size = asyncio.run(_scrape_cost(port, args.scrapes))
        raw = asyncio.run(_raw_cost(port, args.scrapes))
    finally:
        server.stop()
    share = cpu * 8 / 0.05
    print(f"page: {size} bytes ({len(page.splitlines())} lines), vLLM-shaped")
    print(f"extraction only (parse_metrics): {per_extract * 1e6:.1f} us CPU per page")
    print(f"full scrape (aiohttp GET + read + extraction), picker side: {cpu * 1e6:.1f} us CPU, "
          f"{wall * 1e6:.1f} us wall per scrape ({args.scrapes} scrapes)")
    print(f"8 endpoints every 50 ms = 160 scrapes/s: {share * 100:.2f}% of one core")
    print(f"for comparison, a bare asyncio keep-alive GET + extraction: {raw * 1e6:.1f} us CPU per scrape "
          f"({raw * 8 / 0.05 * 100:.2f}% of one core at 8 endpoints / 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
