"""The load generator's measurements against a real aiohttp server on 127.0.0.1 with known delays."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web

from bench.loadgen import Progress, Summary, percentile, run_load
from bench.workloads import LoadSpec, WorkItem, generate, parse_workload

FIRST_DELAY = 0.30  # server waits this long before the first token
TOKEN_GAP = 0.12  # and this long between tokens
TOKENS = 5


class Server:
    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.finished: list[tuple[str, float]] = []  # (first user message, finish time)
        self.started: list[tuple[str, float]] = []
        self.slo_ttft: list[str | None] = []  # each request's x-llm-d-slo-ttft-ms header

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = body["messages"][-1]["content"]
        self.slo_ttft.append(request.headers.get("x-llm-d-slo-ttft-ms"))
        if body.get("model") == "fail":
            return web.json_response({"error": {"message": "boom", "type": "server_error", "code": 503}}, status=503)
        self.started.append((key, time.monotonic()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(FIRST_DELAY)
            for i in range(TOKENS):
                if i:
                    await asyncio.sleep(TOKEN_GAP)
                chunk = {"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            usage = {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": TOKENS, "total_tokens": 105,
                                              "prompt_tokens_details": {"cached_tokens": 64}}}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1
            self.finished.append((key, time.monotonic()))


@pytest.fixture
async def server():
    s = Server()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", s.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def items(n: int, model: str = "m") -> list[WorkItem]:
    return [WorkItem(i, model, [{"role": "user", "content": f"q{i}"}], TOKENS) for i in range(n)]


async def test_ttft_itl_e2e_and_usage_are_measured(server):
    s, url = server
    run = await run_load(url, items(4), LoadSpec(type="concurrency", concurrency=4))
    assert len(run.results) == 4
    for r in run.results:
        assert r.ok, r.error
        # Lower bounds are exact (the server sleeps); upper bounds allow a busy machine.
        assert FIRST_DELAY <= r.ttft < FIRST_DELAY + 0.5
        assert len(r.itl) == TOKENS - 1
        assert all(TOKEN_GAP * 0.9 <= x < TOKEN_GAP + 0.5 for x in r.itl)
        assert r.e2e >= FIRST_DELAY + (TOKENS - 1) * TOKEN_GAP
        assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (100, TOKENS, 64)
    summ = run.summary()
    assert summ.errors == 0
    assert FIRST_DELAY <= summ.ttft_p50 < FIRST_DELAY + 0.5
    assert TOKEN_GAP * 0.9 <= summ.itl_p50 < TOKEN_GAP + 0.5
    assert summ.cached_fraction == pytest.approx(0.64)


async def test_item_headers_are_sent(server):
    s, url = server
    work = items(2)
    work[0].headers = {"x-llm-d-slo-ttft-ms": "500", "x-llm-d-slo-tpot-ms": "30"}
    run = await run_load(url, work, LoadSpec(type="concurrency", concurrency=1))
    assert all(r.ok for r in run.results)
    assert s.slo_ttft == ["500", None]


async def test_errors_are_recorded_not_raised(server):
    _, url = server
    run = await run_load(url, items(2, model="fail"), LoadSpec(type="concurrency", concurrency=2))
    assert [r.status for r in run.results] == [503, 503]
    assert all("boom" in r.error for r in run.results)
    assert run.summary().errors == 2
    dead = await run_load("http://127.0.0.1:1", items(1), LoadSpec(type="concurrency", concurrency=1))
    assert dead.results[0].error and not dead.results[0].ok


async def test_closed_loop_keeps_concurrency(server):
    s, url = server
    await run_load(url, items(9), LoadSpec(type="concurrency", concurrency=3))
    assert s.max_active == 3
    assert len(s.finished) == 9


async def test_open_loop_poisson_rate(server):
    s, url = server
    # 12 arrivals at 40/s: all sent within about 0.3 s, so they overlap (open loop does not wait).
    run = await run_load(url, items(12), LoadSpec(type="poisson", rate=40.0), seed=3)
    assert all(r.ok for r in run.results)
    starts = sorted(r.start for r in run.results)
    assert starts[-1] < 2.0
    assert s.max_active >= 3


async def test_multi_turn_waits_for_previous_turn(server):
    s, url = server
    spec = parse_workload({"workload": {"type": "multi_turn", "num_sessions": 2, "turns": 3, "system_prompt_len": 5,
                                        "user_len": 3, "output_len": TOKENS}, "num_requests": 6})
    work = generate(spec)
    await run_load(url, work, LoadSpec(type="poisson", rate=100.0))
    finished = {k: t for k, t in s.finished}
    started = {k: t for k, t in s.started}
    for it in work:
        if it.turn > 0:
            prev = next(p for p in work if p.session == it.session and p.turn == it.turn - 1)
            assert started[it.messages[-1]["content"]] >= finished[prev.messages[-1]["content"]]


def test_percentile_and_summary_formulas():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 90) == 5
    assert percentile([0, 10], 90) == 9
    from bench.loadgen import RequestResult
    rs = [RequestResult(0, 0, ttft=0.1, e2e=1, output_tokens=10, status=200),
          RequestResult(1, 0, ttft=0.3, e2e=1, output_tokens=30, status=200),
          RequestResult(2, 0, status=500, error="x")]
    summ = Summary.of(rs, duration=2.0)
    assert summ.output_tokens_per_s == 20 and summ.requests_per_s == 1 and summ.errors == 1
    assert summ.ttft_p50 == pytest.approx(0.2)


def test_progress_line(tmp_path):
    import io
    buf = io.StringIO()
    p = Progress("routing", 10, stream=buf)
    p.update(5, force=True)
    p.close()
    assert "routing [" in buf.getvalue() and "5/10" in buf.getvalue()
