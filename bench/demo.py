"""`epp demo`: the whole stack locally, the picker against Envoy's own round-robin.

Starts simulated H100 servers (`epp sim`), the picker (`epp serve`) and the real Envoy,
drives a shared-prefix chat workload through them with a live progress bar, then the
same workload through Envoy's round-robin on fresh servers (cold caches, so both phases
start equal), and prints a side-by-side table and PNG plots.

The simulator runs in slow motion (--time-scale 0.1: ten wall seconds per simulated
second), so prefilling a long uncached system prompt costs real, visible time (3,000
tokens: 0.15 s on the simulated H100, 1.5 s on the wall clock) while the Python processes'
own overhead stays small beside it. Many distinct system prompts (tenants) and a load the
servers can carry only if most prompts hit the cache make round-robin's misses hurt.
Every process is stopped by pid on every exit path, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import Progress, run_load
from bench.report import (
    Row,
    machine,
    ms,
    num,
    pct,
    plot_per_server,
    plot_ttft_cdf,
    plot_ttft_over_time,
    table,
)
from bench.strategies import stack
from bench.workloads import LoadSpec, SharedPrefix, WorkloadSpec, generate
from devstack.launch import envoy_binary, stop_all
from devstack.localstack import hit_rate

OUT_DIR = Path("bench/out/demo")


@dataclass(slots=True)
class DemoSettings:
    servers: int = 4
    time_scale: float = 0.1
    # each phase's workload: 240 requests at 6/s, shared-prefix with 16 system prompts of 3,000
    # tokens, 8 prompts each, 40-token questions, 24 output tokens
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(
        "shared_prefix", SharedPrefix(16, 8, 3000, 40, 24), num_requests=240, load=LoadSpec("poisson", rate=6.0)))
    out: Path = OUT_DIR
    plots: bool = True


def parse_args(argv: list[str]) -> DemoSettings:
    d = DemoSettings()
    dw = d.workload
    ap = argparse.ArgumentParser(prog="epp demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=d.servers, help="simulated model servers")
    ap.add_argument("--requests", type=int, default=dw.num_requests, help="requests per phase")
    ap.add_argument("--rate", type=float, default=dw.load.rate, help="Poisson arrivals per wall second")
    ap.add_argument("--time-scale", type=float, default=d.time_scale,
                    help="simulated seconds per wall second (0.1 = 10x slow motion)")
    ap.add_argument("--groups", type=int, default=dw.params.num_groups, help="distinct system prompts")
    ap.add_argument("--prompts-per-group", type=int, default=dw.params.num_prompts_per_group)
    ap.add_argument("--system-prompt-len", type=int, default=dw.params.system_prompt_len, help="tokens")
    ap.add_argument("--question-len", type=int, default=dw.params.question_len, help="tokens")
    ap.add_argument("--output-len", type=int, default=dw.params.output_len, help="tokens")
    ap.add_argument("--seed", type=int, default=dw.seed)
    ap.add_argument("--out", type=Path, default=d.out, help="directory for the PNG plots")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    a = ap.parse_args(argv)
    for key in ("servers", "requests", "groups", "prompts_per_group", "system_prompt_len", "output_len"):
        if getattr(a, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if a.rate <= 0 or a.time_scale <= 0:
        ap.error("--rate and --time-scale must be > 0")
    prefix = SharedPrefix(a.groups, a.prompts_per_group, a.system_prompt_len, a.question_len, a.output_len)
    spec = WorkloadSpec("shared_prefix", prefix, num_requests=a.requests, seed=a.seed, load=LoadSpec("poisson", rate=a.rate))
    return DemoSettings(servers=a.servers, time_scale=a.time_scale, workload=spec, out=a.out, plots=a.plots)


def run_phase(name: str, strategy: str, s: DemoSettings) -> Row:
    spec = s.workload
    items = generate(spec)
    print(f"\n== {name}: starting {s.servers} simulator servers"
          f"{', the picker' if strategy.startswith('picker') else ''} and Envoy ...", flush=True)
    t0 = time.monotonic()
    with stack(strategy, s.servers, model=spec.model, time_scale=s.time_scale) as st:
        print(f"   up in {time.monotonic() - t0:.1f}s; Envoy at {st.url}; sending {len(items)} requests "
              f"at {spec.load.rate:g}/s", flush=True)
        before = st.sims.counts()
        progress = Progress(f"   {name:<11}", len(items))
        run = asyncio.run(run_load(st.url, items, spec.load, seed=spec.seed, progress=progress))
        after = st.sims.counts()
    served = [a - b for a, b in zip(after, before, strict=True)]
    return Row(name, spec.load.rate, run.summary(), hit_rate(served), [c.requests for c in served], run.results)


def comparison_table(rows: list[Row]) -> str:
    headers = ["", *(r.strategy for r in rows)]
    lines = [
        ["TTFT p50 (ms)", *(ms(r.summary.ttft_p50) for r in rows)],
        ["TTFT p90 (ms)", *(ms(r.summary.ttft_p90) for r in rows)],
        ["output tokens/s", *(num(r.summary.output_tokens_per_s, 0) for r in rows)],
        ["prefix-cache hit rate", *(pct(r.hit_rate) for r in rows)],
        ["requests per server", *(" ".join(str(int(c)) for c in r.per_server) for r in rows)],
        ["errors", *(str(r.summary.errors) for r in rows)],
    ]
    return table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        envoy_binary()
    except FileNotFoundError as e:
        print(f"epp demo: {e}", file=sys.stderr)
        return 1
    spec, prefix = s.workload, s.workload.params
    print(f"epp demo: {s.servers} simulated H100 servers (Llama-3.1-8B timing) at time-scale {s.time_scale:g}"
          f" ({1 / s.time_scale:g}x slow motion); {prefix.num_groups} system prompts of "
          f"{prefix.system_prompt_len} tokens, {prefix.question_len}-token questions, "
          f"{prefix.output_len} output tokens; {spec.num_requests} requests per phase"
          f" at {spec.load.rate:g}/s.\nmachine: {machine()}", flush=True)
    started = time.monotonic()
    try:
        rows = [run_phase("picker", "picker", s), run_phase("round-robin", "envoy-round-robin", s)]
    except KeyboardInterrupt:
        stop_all()
        print("\nepp demo: interrupted; every process stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"\nepp demo: {e}", file=sys.stderr)
        return 1
    print("\n" + comparison_table(rows))
    p, rr = rows
    if p.summary.ttft_p90 and rr.summary.ttft_p90:
        print(f"\nthe picker: TTFT p90 {rr.summary.ttft_p90 / p.summary.ttft_p90:.1f}x lower, "
              f"hit rate {pct(p.hit_rate)} vs {pct(rr.hit_rate)}")
    if s.plots:
        plot_ttft_cdf(rows, s.out / "ttft_cdf.png", "Time to first token: picker vs. round-robin")
        plot_per_server(rows, s.out / "requests_per_server.png", "Requests per server")
        plot_ttft_over_time(rows, s.out / "ttft_over_time.png", "Time to first token over the run")
        print(f"plots: {', '.join(str(s.out / n) for n in ('ttft_cdf.png', 'requests_per_server.png', 'ttft_over_time.png'))}")
    print(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
