"""CPU cost of scraping model servers' /metrics pages, as the picker does it.

    .venv/bin/python -m bench.scrape_cost [--size-kb 40] [--scrapes 2000] [--rounds 10]
                                          [--endpoints 8] [--seconds 2]

Prints (1) the extraction cost alone (parse_metrics on a realistic vLLM page);
(2) the picker-side CPU of one full scrape over HTTP, scrapes back to back, measured
with thread CPU time while the pages are served by a separate process, for three
clients in interleaved rounds of one run: aiohttp as the collector used it before,
the collector's own HttpGetClient (epp.datalayer.httpget), and a bare asyncio
protocol (the floor), with the CPU share at 8 endpoints every 50 ms and the ratios;
(3) the steady state: a real MetricsCollector scraping `--endpoints` endpoints every
50 ms (its sleeps and wake-ups included), on aiohttp and on HttpGetClient, alternated.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from devstack.launch import Process, free_ports, port_open, python_module_argv, wait_until
from epp.datalayer.collector import ScrapeStats

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
def _serve(ports: list[int], size_kb: int) -> None:
    """One aiohttp app (as the simulator and many exporters serve) on several ports, one per
    stand-in endpoint."""
    from aiohttp import web

    page = realistic_vllm_page(target_kb=size_kb)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for port in ports:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()  # until stopped by pid

    asyncio.run(serve())


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


_METHODS = ("aiohttp", "httpget", "bare")


async def _aiohttp_scrapers(port: int, path: str) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """The collector's scrape as it was with aiohttp (same session settings, page bound,
    extraction and publishing), kept here as the baseline."""
    import aiohttp

    from epp.datalayer import DEFAULT_SPECS, parse_metrics
    from epp.datalayer.collector import MAX_PAGE_BYTES
    from epp.datalayer.datastore import Datastore, EndpointSpec

    ds = Datastore()
    ep = ds.upsert(EndpointSpec(name="bench-aiohttp", address="127.0.0.1", port=port))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=1.0),
        headers={"Accept-Encoding": "identity", "Accept": "text/plain"},
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    url, spec = f"http://127.0.0.1:{port}{path}", DEFAULT_SPECS["vllm"]

    async def once() -> None:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_PAGE_BYTES:
                raise ValueError("page too large")
            page = await resp.read()
        ds.set_metrics(ep, parse_metrics(page, spec, time.monotonic()))
        if not ep.metrics.ok:
            raise RuntimeError("aiohttp scrape failed")

    return once, session.close


async def _httpget_scrapers(port: int, path: str) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """The collector's own scrape routine (HttpGetClient + extraction + publishing)."""
    from epp.datalayer import MetricsCollector
    from epp.datalayer.datastore import Datastore, EndpointSpec

    ds = Datastore()
    ep = ds.upsert(EndpointSpec(name="bench-httpget", address="127.0.0.1", port=port))
    # Not started: its scrape routine is driven directly, back to back.
    collector = MetricsCollector(ds, interval=3600.0, path=path)
    client, stats = collector._client(ep), collector._stats.setdefault(ep, ScrapeStats())

    async def once() -> None:
        ok = stats.ok
        await collector._poll_once(ep, client, stats)
        if stats.ok != ok + 1 or ep.metrics.num_gpu_blocks != 27400:
            raise RuntimeError(f"httpget scrape failed: {stats}")

    return once, client.close


class _RawClient(asyncio.Protocol):
    """For comparison only: the least a keep-alive HTTP/1.1 GET can cost in asyncio
    (Content-Length responses only, no timeout, no size cap). Not used by the picker."""

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


async def _bare_scrapers(port: int, path: str) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    from epp.datalayer import DEFAULT_SPECS, parse_metrics

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_RawClient, "127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept-Encoding: identity\r\n\r\n".encode()

    async def once() -> None:
        proto.waiter = loop.create_future()
        transport.write(request)
        parse_metrics(await proto.waiter, DEFAULT_SPECS["vllm"], 1.0)

    async def close() -> None:
        transport.close()

    return once, close


async def _compare(port: int, n: int, rounds: int) -> tuple[dict[str, list[float]], float, int]:
    """Per-scrape thread CPU of each method, measured in interleaved rounds in one process
    against one server, so background load hits all of them alike. Returns the per-round
    figures per method, the httpget wall time per scrape and the page size."""
    makers = {"aiohttp": _aiohttp_scrapers, "httpget": _httpget_scrapers, "bare": _bare_scrapers}
    scrapers = {name: await make(port, "/metrics") for name, make in makers.items()}
    cpu: dict[str, list[float]] = {name: [] for name in _METHODS}
    wall = 0.0
    per_round = max(1, n // rounds)
    try:
        for once, _ in scrapers.values():
            for _ in range(100):  # warm-up: connections open, caches hot
                await once()
        for _ in range(rounds):
            for name in _METHODS:
                once = scrapers[name][0]
                c0, w0 = time.thread_time(), time.perf_counter()
                for _ in range(per_round):
                    await once()
                cpu[name].append((time.thread_time() - c0) / per_round)
                if name == "httpget":
                    wall += (time.perf_counter() - w0) / per_round / rounds
        from epp.datalayer.httpget import HttpGetClient

        probe = HttpGetClient("127.0.0.1", port)
        size = len((await probe.get("/metrics")).body)
        await probe.close()
    finally:
        for _, close in scrapers.values():
            await close()
    return cpu, wall, size


class _AiohttpGet:
    """The old collector's HTTP path behind HttpGetClient's interface, so the collector
    itself can run on either client."""

    def __init__(self, session, host: str, port: int) -> None:
        self.session, self.base = session, f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, *, max_body: int):
        from epp.datalayer.httpget import BodyTooLarge, Response

        async with self.session.get(self.base + path) as resp:
            if resp.content_length is not None and resp.content_length > max_body:
                raise BodyTooLarge(f"body of {resp.content_length} bytes exceeds {max_body}")
            return Response(resp.status, resp.reason or "", {}, await resp.read(), True)

    async def close(self) -> None:
        pass


def _aiohttp_collector(ds, interval: float):
    """MetricsCollector scraping through aiohttp, configured as it was before HttpGetClient."""
    import aiohttp

    from epp.datalayer import MetricsCollector

    class AiohttpCollector(MetricsCollector):
        session: aiohttp.ClientSession | None = None

        async def start(self) -> None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept-Encoding": "identity", "Accept": "text/plain"},
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
            await super().start()

        async def stop(self) -> None:
            await super().stop()
            if self.session is not None:
                await self.session.close()

        def _client(self, ep):
            return _AiohttpGet(self.session, ep.address, self.port_override or ep.port)

    return AiohttpCollector(ds, interval=interval)


async def _steady_state(ports: list[int], seconds: float, rounds: int) -> dict[str, tuple[float, float]]:
    """The collector as the picker runs it: one scrape task per endpoint every 50 ms, with
    its sleeps and timers. Per client kind: (share of one core, scrapes per second), as the
    median over rounds that alternate between the two kinds."""
    from epp.datalayer import MetricsCollector
    from epp.datalayer.datastore import Datastore, EndpointSpec

    results: dict[str, list[tuple[float, float]]] = {"aiohttp": [], "httpget": []}
    for _ in range(rounds):
        for kind in results:
            ds = Datastore()
            ds.replace_all([EndpointSpec(name=f"ep{i}", address="127.0.0.1", port=port)
                            for i, port in enumerate(ports)])
            collector = (_aiohttp_collector(ds, 0.05) if kind == "aiohttp"
                         else MetricsCollector(ds, interval=0.05))
            await collector.start()
            try:
                deadline = time.monotonic() + 15
                while not all(e.metrics.ok for e in ds.endpoints()):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{kind}: endpoints not scraped: "
                                           f"{[collector.stats(e) for e in ds.endpoints()]}")
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # settle: every task in its periodic rhythm
                ok0 = sum(collector.stats(e).ok for e in ds.endpoints())
                c0, w0 = time.thread_time(), time.perf_counter()
                await asyncio.sleep(seconds)
                cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
                done = sum(collector.stats(e).ok for e in ds.endpoints()) - ok0
                if any(collector.stats(e).failed for e in ds.endpoints()):
                    raise RuntimeError(f"{kind}: scrapes failed")
            finally:
                await collector.stop()
            results[kind].append((cpu / wall, done / wall))
    return {kind: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for kind, rs in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape_cost")
    p.add_argument("--size-kb", type=int, default=40)
    p.add_argument("--scrapes", type=int, default=2000, help="per method, split over the rounds")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (median reported)")
    p.add_argument("--endpoints", type=int, default=8, help="steady state: endpoints scraped every 50 ms")
    p.add_argument("--seconds", type=float, default=2.0, help="steady state: seconds per round")
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve([int(port) for port in args.serve.split(",")], args.size_kb)
        return 0
    page = realistic_vllm_page(target_kb=args.size_kb)
    per_extract = _extract_cost(page, args.scrapes)
    ports = free_ports(max(1, args.endpoints))
    server = Process(python_module_argv("bench.scrape_cost", "--serve", ",".join(map(str, ports)),
                                        "--size-kb", str(args.size_kb)), name="metrics-server")
    try:
        wait_until(lambda: all(port_open(p) for p in ports), 15, "bench metrics server")
        cpu, wall, size = asyncio.run(_compare(ports[0], args.scrapes, args.rounds))
        steady = asyncio.run(_steady_state(ports, args.seconds, 2)) if args.endpoints > 0 else {}
    finally:
        server.stop()
    med = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"page: {size} bytes ({len(page.splitlines())} lines), vLLM-shaped; "
          f"{args.scrapes} scrapes per method in {args.rounds} interleaved rounds, median of rounds")
    print(f"extraction only (parse_metrics): {per_extract * 1e6:.1f} us CPU per page")
    labels = {"aiohttp": "aiohttp GET + read + extraction (the old collector)",
              "httpget": "HttpGetClient GET + extraction (the collector now)",
              "bare": "bare asyncio protocol GET + extraction (floor)"}
    for name in _METHODS:
        lo, hi = min(cpu[name]), max(cpu[name])
        print(f"{labels[name]}: {med[name] * 1e6:.1f} us CPU per scrape (rounds {lo * 1e6:.1f}-{hi * 1e6:.1f}); "
              f"8 endpoints every 50 ms = 160 scrapes/s: {med[name] * 8 / 0.05 * 100:.2f}% of one core")
    print(f"httpget wall per scrape: {wall * 1e6:.1f} us")
    print(f"ratios (same run): httpget/aiohttp {med['httpget'] / med['aiohttp']:.3f}, "
          f"httpget/bare {med['httpget'] / med['bare']:.3f}; "
          f"HTTP-only cost (minus extraction): aiohttp {(med['aiohttp'] - per_extract) * 1e6:.1f} us, "
          f"httpget {(med['httpget'] - per_extract) * 1e6:.1f} us, bare {(med['bare'] - per_extract) * 1e6:.1f} us")
    for kind, (share, rate) in steady.items():
        print(f"steady state, MetricsCollector on {kind}, {args.endpoints} endpoints every 50 ms: "
              f"{share * 100:.2f}% of one core ({rate:.0f} scrapes/s, {share / rate * 1e6:.1f} us per scrape)")
    if steady:
        print(f"steady-state ratio (same run): httpget/aiohttp {steady['httpget'][0] / steady['aiohttp'][0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
