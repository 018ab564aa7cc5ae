"""`epp bench agree`: the same small workload through the real stack and through the
cluster simulation must give throughput and median time to first token within a
tolerance (15%) of each other.

The real simulator servers run at --time-scale S (S simulated seconds per wall second);
the cluster simulation runs the same engine model in virtual time with arrivals at
rate / S and reports virtual seconds, which are divided by S to compare with the wall
clock.

The engine model has no notion of the gateway: the client, Envoy, the picker's ext_proc
round trip and the HTTP front add a few tens of milliseconds of wall time to every
request (more on a busy 2-core machine). Left out, the simulation's median TTFT came out
12-31% below the real one at --time-scale 0.1 in five runs on 2 busy cores. So
the check first measures that latency on the same stack, with sequential requests on
idle servers (real TTFT minus the engine model's TTFT for the same requests), and gives
it to the simulation as ClusterConfig.gateway_latency; then the workload itself must agree.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from bench.cluster import ClusterConfig, scaled, simulate
from bench.loadgen import Progress, Summary, percentile, run_load
from bench.strategies import stack
from bench.workloads import LoadSpec, SharedPrefix, WorkloadSpec, generate
from devstack.localstack import hit_rate
from simulator.engine import EngineConfig

# Real-stack strategy -> the cluster simulation's equivalent.
EQUIVALENT = {"picker": "picker", "picker-random": "picker-random", "envoy-round-robin": "round-robin",
              "envoy-random": "random", "envoy-least-request": "least-queue"}


@dataclass(slots=True)
class Agreement:
    strategy: str
    real: Summary
    sim: Summary
    real_hit_rate: float
    sim_hit_rate: float
    tolerance: float
    gateway_latency: float  # measured, wall seconds
    uncalibrated: Summary  # the simulation without gateway latency

    @staticmethod
    def diff(a: float, b: float) -> float:
        """Relative difference of b from a."""
        return abs(b - a) / a if a else math.inf

    @property
    def throughput_diff(self) -> float:
        return self.diff(self.real.output_tokens_per_s, self.sim.output_tokens_per_s)

    @property
    def ttft_diff(self) -> float:
        return self.diff(self.real.ttft_p50, self.sim.ttft_p50)

    @property
    def ok(self) -> bool:
        return (self.real.errors == 0 and self.sim.errors == 0 and self.throughput_diff <= self.tolerance
                and self.ttft_diff <= self.tolerance)


def run_agree(spec: WorkloadSpec, *, servers: int, time_scale: float, strategy: str = "picker",
              tolerance: float = 0.15, sim_flags: tuple[str, ...] = ()) -> Agreement:
    if strategy not in EQUIVALENT:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(EQUIVALENT)})")
    items = generate(spec)
    probe = calibration_workload(spec.model)
    probe_items = generate(probe)
    with stack(strategy, servers, model=spec.model, time_scale=time_scale, sim_flags=sim_flags) as st:
        before = st.sims.counts()
        real = asyncio.run(run_load(st.url, items, spec.load, seed=spec.seed,
                                    progress=Progress(f"agree real {strategy}", len(items))))
        after = st.sims.counts()
        real_probe = asyncio.run(run_load(st.url, probe_items, probe.load))
    real_hit = hit_rate([a - b for a, b in zip(after, before, strict=True)])
    cfg = ClusterConfig(servers=servers, engine=EngineConfig(), seed=spec.seed, model=spec.model)
    sim_strategy = EQUIVALENT[strategy]
    sim_probe = simulate(sim_strategy, probe_items, probe.load, cfg, time_scale=time_scale)
    latency = max(0.0, _median_ttft(real_probe.results) - _median_ttft(scaled(sim_probe, time_scale).results))
    bare = scaled(simulate(sim_strategy, items, spec.load, cfg, time_scale=time_scale), time_scale)
    cfg.gateway_latency = latency
    sim = scaled(simulate(sim_strategy, items, spec.load, cfg, time_scale=time_scale,
                          progress=Progress(f"agree sim  {sim_strategy}", len(items))), time_scale)
    return Agreement(strategy, real.summary(), sim.summary(), real_hit, sim.hit_rate, tolerance, latency,
                     bare.summary())


def calibration_workload(model: str) -> WorkloadSpec:
    """Sequential short requests (one at a time, idle servers): their TTFT is engine time
    plus gateway latency and nothing else."""
    return WorkloadSpec("shared_prefix", SharedPrefix(num_groups=1, num_prompts_per_group=16, system_prompt_len=200,
                                                      question_len=20, output_len=2),
                        num_requests=16, seed=99, model=model, load=LoadSpec(type="concurrency", concurrency=1))


def _median_ttft(results) -> float:
    return percentile([r.ttft for r in results if r.ok and r.ttft is not None], 50)
