"""`epp bench routing`: one workload and rate sweep through the real Envoy with each
routing strategy (bench.strategies), every run on fresh simulator servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from bench.loadgen import Progress, run_load
from bench.report import Row
from bench.strategies import stack
from bench.workloads import WorkloadSpec, generate
from devstack.localstack import hit_rate


def run_routing(spec: WorkloadSpec, strategies: Sequence[str], rates: Sequence[float], *, servers: int,
                time_scale: float, sim_flags: Sequence[str] = (),
                on_row: Callable[[Row], None] | None = None) -> list[Row]:
    items = generate(spec)
    rows = []
    for rate in rates:
        load = spec.load if spec.load.type == "concurrency" else type(spec.load)(type="poisson", rate=rate)
        for strategy in strategies:
            with stack(strategy, servers, model=spec.model, time_scale=time_scale, sim_flags=sim_flags) as st:
                before = st.sims.counts()
                progress = Progress(f"routing {strategy:<20} rate {rate:g}/s", len(items))
                run = asyncio.run(run_load(st.url, items, load, seed=spec.seed, progress=progress))
                after = st.sims.counts()
            served = [a - b for a, b in zip(after, before, strict=True)]
            row = Row(strategy, rate if load.type == "poisson" else None, run.summary(), hit_rate(served),
                      [c.requests for c in served], run.results)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
