"""CPU cost of the simulator: one `epp sim` process with 8 replicas, driven over HTTP.

    .venv/bin/python -m bench.sim_cost [--replicas 8] [--requests 400] [--concurrency 64] [--json]

Reads the sim process's CPU time (utime + stime from /proc/<pid>/stat) around four
phases: idle, streamed requests with 1 output token (the fixed cost of a request),
streamed requests with --max-tokens output tokens (the marginal cost of a streamed
token), and /metrics scrapes of every replica. The load generator runs in this process,
so its CPU is not counted. Idle CPU over each phase's wall time is subtracted."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from bench.report import numeric_flags
from devstack.launch import cpu_seconds
from devstack.localstack import start_sims

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
@dataclass
class Phase:
    name: str
    wall_s: float
    cpu_s: float
    net_cpu_s: float  # minus idle CPU over the same wall time
    requests: int
    tokens: int


async def _stream_one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        raw = await r.read()
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-100:]
    return raw.count(b'"text":')


async def _load(urls: list[str], n: int, concurrency: int, max_tokens: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    system = "You are a concise assistant for an online bookshop. Answer in one sentence. " * 6

    async def one(i: int, session: aiohttp.ClientSession) -> int:
        async with sem:
            prompt = f"{system} Customer {i % 50} asks about order {i}."
            return await _stream_one(session, urls[i % len(urls)], prompt, max_tokens)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
        counts = await asyncio.gather(*(one(i, session) for i in range(n)))
    return sum(counts)


async def _scrape(urls: list[str], seconds: float, interval: float) -> int:
    n = 0
    async with aiohttp.ClientSession() as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            for u in urls:
                async with session.get(u + "/metrics") as r:
                    await r.read()
                n += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    return n


def measure(args: argparse.Namespace) -> dict:
    sims = start_sims(args.replicas, model=MODEL, time_scale=args.time_scale,
                      log_dir=Path(tempfile.mkdtemp(prefix="sim_cost_")), timeout=30)
    urls = [sims.url(i) for i in range(args.replicas)]
    try:
        pid = sims.process.pid

        def run(name: str, fn, requests: int = 0) -> Phase:
            c0, t0 = cpu_seconds(pid), time.monotonic()
            tokens = fn()
            c1, t1 = cpu_seconds(pid), time.monotonic()
            return Phase(name, t1 - t0, c1 - c0, 0.0, requests, tokens or 0)

        asyncio.run(_load(urls, 2 * args.replicas, 8, 2))  # warm-up: imports, connections
        idle = run("idle", lambda: time.sleep(args.idle_seconds))
        idle_rate = idle.cpu_s / idle.wall_s
        phases = [idle,
                  run("stream_1_token", lambda: asyncio.run(_load(urls, args.requests, args.concurrency, 1)),
                      args.requests),
                  run(f"stream_{args.max_tokens}_tokens",
                      lambda: asyncio.run(_load(urls, args.requests, args.concurrency, args.max_tokens)),
                      args.requests)]
        scrape = run("metrics_scrapes", lambda: asyncio.run(_scrape(urls, args.scrape_seconds, 0.05)))
        scrape.requests, scrape.tokens = scrape.tokens, 0
        phases.append(scrape)
        for p in phases[1:]:
            p.net_cpu_s = p.cpu_s - idle_rate * p.wall_s
        one, many = phases[1], phases[2]
        per_request = one.net_cpu_s / one.requests
        per_token = (many.net_cpu_s - per_request * many.requests) / max(1, many.tokens - many.requests)
        page = asyncio.run(_page_size(urls[0]))
    finally:
        sims.stop()
    return {
        "replicas": args.replicas, "concurrency": args.concurrency, "time_scale": args.time_scale,
        "idle_cpu_per_wall_s": idle_rate,
        "cpu_per_request_s": per_request,
        "cpu_per_streamed_token_s": per_token,
        "cpu_per_metrics_scrape_s": scrape.net_cpu_s / max(1, scrape.requests),
        "metrics_page_bytes": page,
        "phases": [asdict(p) for p in phases],
    }


async def _page_size(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return len(await r.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_cost", description=__doc__.split("\n\n")[0])
    numeric_flags(p, replicas=8, requests=400, concurrency=64, max_tokens=64, time_scale=1.0, idle_seconds=2.0,
                  scrape_seconds=3.0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    r = measure(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"sim CPU cost: 1 process, {r['replicas']} replicas, concurrency {r['concurrency']}, "
          f"time scale {r['time_scale']}")
    for ph in r["phases"]:
        print(f"  {ph['name']:<22} wall {ph['wall_s']:8.3f} s  cpu {ph['cpu_s']:8.3f} s  "
              f"net {ph['net_cpu_s']:8.3f} s  requests {ph['requests']:6d}  tokens {ph['tokens']:7d}")
    print(f"  idle CPU:              {r['idle_cpu_per_wall_s'] * 1e3:.3f} ms per wall second")
    print(f"  CPU per request:       {r['cpu_per_request_s'] * 1e6:.1f} us (streamed, 1 output token)")
    print(f"  CPU per streamed token: {r['cpu_per_streamed_token_s'] * 1e6:.1f} us (marginal)")
    print(f"  CPU per /metrics scrape: {r['cpu_per_metrics_scrape_s'] * 1e6:.1f} us "
          f"(page {r['metrics_page_bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
