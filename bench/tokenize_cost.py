"""Hot-path cost of token-producer's tokenization (epp.requestcontrol.producers.tokens).

    .venv/bin/python -m bench.tokenize_cost [--rounds 20] [--tokenizer tests/fixtures/tokenizer]

For chat requests whose system prompt is about 1k, 8k and 32k characters (English-like text
from the README) followed by a short user message, prints the median of the request's wait
(the director's await before the cycle + PrepareData) and of the longest time the event
loop was held meanwhile (what every other request on the loop waits), for:
- inProcess: the in-process backend (chat template + `tokenizers`), uncached (a system
  prompt never seen before: a piece of 2,048 characters or more is encoded by the library's
  own threads in the await) and cached (the same system prompt, a new user message: its
  piece comes from the piece cache);
- vllm: the await before the cycle plus PrepareData with the vllm backend against a render
  endpoint on 127.0.0.1 (an `epp sim --tokenizer` process), uncached (one render round
  trip: the loop is free meanwhile but for the request's JSON encoding and the answer's
  parsing) and cached (the body rendered before: the render key digest and a cache lookup,
  no I/O);
- estimate: the 4-bytes-per-token estimate, for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from epp.assembly import build_plugin
from epp.framework import CycleState, InferenceRequest, PluginHandle

ROOT = Path(__file__).parents[1]
DEFAULT_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
SIZES = (1_000, 8_000, 32_000)
MODEL = "bench-model"


def _words() -> list[str]:
    return (ROOT / "README.md").read_text().split()


def system_prompt(chars: int, seed: int) -> str:
    words = _words()
    out, n, i = [], 0, seed * 7919
    while n < chars:
        w = words[i % len(words)]
        out.append(w)
        n += len(w) + 1
        i += 13
    return " ".join(out)[:chars]


def request(system: str, user: str, rid: str) -> InferenceRequest:
    body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return InferenceRequest(rid, MODEL, MODEL, "chat", system + user, {}, body=body)


async def _ticker(stop: asyncio.Event, worst: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0)
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last)
        last = now


async def _median(fn: Callable[[int], Awaitable[None]], rounds: int) -> tuple[float, float]:
    """Median wait and median longest loop hold of fn over `rounds` calls."""
    waits, holds = [], []
    for i in range(rounds):
        stop, worst = asyncio.Event(), [0.0]
        ticker = asyncio.create_task(_ticker(stop, worst))
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await fn(i)
        waits.append(time.perf_counter() - t0)
        stop.set()
        await ticker
        holds.append(worst[0])
    return statistics.median(waits), statistics.median(holds)


async def measure(tokenizer_dir: Path, rounds: int) -> list[tuple[str, int, str, tuple[float, float]]]:
    from devstack.localstack import start_sims

    sim = start_sims(1, model=MODEL, log_dir=Path(tempfile.mkdtemp(prefix="tokenize-cost-")),
                     flags={"tokenizer": str(tokenizer_dir)})
    h = PluginHandle()
    local = build_plugin("token-producer", "t", {"inProcess": {"path": str(tokenizer_dir)}}, h, "bench")
    vllm = build_plugin("token-producer", "t", {"modelName": MODEL, "vllm": {"url": sim.url(0)}}, h, "bench")
    estimate = build_plugin("token-producer", "t", None, h, "bench")
    ids = itertools.count()
    out = []

    async def run(p, req):
        prefetch = getattr(p, "prefetch_request_data", None)
        if prefetch is not None:
            await prefetch(req)
        p.prepare_request_data(CycleState(), req, [])

    try:
        for chars in SIZES:
            fresh = lambda i, c=chars: request(system_prompt(c, next(ids)), f"question {i}", f"r{next(ids)}")  # noqa: E731
            shared = system_prompt(chars, 0)
            await run(local, request(shared, "warm", "w"))
            await run(vllm, request(shared, "warm", "w"))
            pre_local = [fresh(i) for i in range(rounds)]
            pre_vllm = [fresh(i) for i in range(rounds)]

            async def local_uncached(i, pre=pre_local):
                await run(local, pre[i])

            async def local_cached(i, s=shared):
                await run(local, request(s, f"new question {i}", f"c{i}"))

            async def vllm_uncached(i, pre=pre_vllm):
                await run(vllm, pre[i])

            async def vllm_cached(i, s=shared):
                await run(vllm, request(s, "warm", f"v{i}"))

            async def est(i, s=shared):
                await run(estimate, request(s, f"q {i}", "e"))

            out += [("inProcess", chars, "uncached", await _median(local_uncached, rounds)),
                    ("inProcess", chars, "cached", await _median(local_cached, rounds)),
                    ("vllm", chars, "uncached", await _median(vllm_uncached, rounds)),
                    ("vllm", chars, "cached", await _median(vllm_cached, rounds)),
                    ("estimate", chars, "-", await _median(est, rounds))]
    finally:
        await vllm.render.close()
        sim.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    rows = asyncio.run(measure(args.tokenizer, args.rounds))
    print(f"{'backend':<10} {'chars':>6} {'prefix':<9} {'wait':>10} {'loop held':>10}")
    for backend, chars, prefix, (wait, held) in rows:
        print(f"{backend:<10} {chars:>6} {prefix:<9} {wait * 1e6:>8.1f}us {held * 1e6:>8.1f}us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
