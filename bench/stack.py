"""The real stack on 127.0.0.1 for benchmarks and the demo: `epp sim` servers, the picker
(`epp serve`) and the real Envoy, on free ports, each stopped by pid on every exit path.

Routing strategies through Envoy:
  envoy-round-robin     Envoy's ROUND_ROBIN over the servers (no picker)
  envoy-least-request   Envoy's LEAST_REQUEST
  envoy-random          Envoy's RANDOM
  picker                Envoy ext_proc (full duplex) -> the picker, default configuration
  picker-random         the picker with a random-picker configuration
  picker:<path>         the picker with that EndpointPickerConfig file
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import RANDOM_PICKER_CONFIG
from devstack.envoy import Envoy, start_envoy
from devstack.localstack import PickerProcess, ServerCounts, SimServers, start_picker, start_sims

ENVOY_STRATEGIES = {"envoy-round-robin": "round-robin", "envoy-least-request": "least-request",
                    "envoy-random": "random"}
ROUTING_STRATEGIES = ("envoy-round-robin", "envoy-least-request", "picker-random", "picker")


def hit_rate(counts: Sequence[ServerCounts]) -> float:
    q = sum(c.prefix_queries for c in counts)
    return sum(c.prefix_hits for c in counts) / q if q else float("nan")


def picker_config(strategy: str) -> str | None:
    if strategy == "picker":
        return None
    if strategy == "picker-random":
        return RANDOM_PICKER_CONFIG
    if strategy.startswith("picker:"):
        path = strategy.partition(":")[2]
        try:
            return Path(path).read_text()
        except OSError as e:
            raise ValueError(f"strategy {strategy}: cannot read config: {e}") from None
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(ROUTING_STRATEGIES)}, envoy-random, "
                     "picker:<config file>)")


@dataclass
class Stack:
    url: str  # Envoy's listener
    sims: SimServers
    envoy: Envoy
    picker: PickerProcess | None


@contextlib.contextmanager
def stack(strategy: str, n: int, *, model: str, time_scale: float, sim_flags: Sequence[str] = (),
          log_dir: Path | None = None) -> Iterator[Stack]:
    """Fresh simulator servers (cold caches), the picker if the strategy needs one, and
    Envoy in front; everything stopped when the block exits, however it exits."""
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-bench-")
        log_dir = Path(tmp.name)
    config = None if strategy in ENVOY_STRATEGIES else picker_config(strategy)
    sims = picker = env = None
    try:
        sims = start_sims(n, model=model, time_scale=time_scale, log_dir=log_dir, flags=sim_flags)
        if strategy in ENVOY_STRATEGIES:
            env = start_envoy(ENVOY_STRATEGIES[strategy], backends=sims.hostports, log_dir=log_dir)
        else:
            picker = start_picker(endpoints=sims.hostports, config_text=config, log_dir=log_dir)
            env = start_envoy("full-duplex", epp_port=picker.grpc_port, log_dir=log_dir)
        yield Stack(env.url, sims, env, picker)
    finally:
        for part in (env, picker, sims):
            if part is not None:
                part.stop()
        if tmp is not None:
            tmp.cleanup()
