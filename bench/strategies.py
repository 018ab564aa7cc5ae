"""Routing strategies by name, for the real stack (devstack.localstack) and the cluster simulation.

Through the real Envoy (`epp bench routing`, `agree`, the demo):
  envoy-round-robin     Envoy's ROUND_ROBIN over the servers (no picker)
  envoy-least-request   Envoy's LEAST_REQUEST
  envoy-random          Envoy's RANDOM
  picker                Envoy ext_proc (full duplex) -> the picker, default configuration
  picker-random         the picker with a random-picker configuration
  picker:<path>         the picker with that EndpointPickerConfig file
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from devstack.localstack import LocalStack, local_stack

RANDOM_PICKER_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""

ENVOY_STRATEGIES = {"envoy-round-robin": "round-robin", "envoy-least-request": "least-request",
                    "envoy-random": "random"}
ROUTING_STRATEGIES = ("envoy-round-robin", "envoy-least-request", "picker-random", "picker")


def picker_config(strategy: str, known: Sequence[str] = (*ROUTING_STRATEGIES, "envoy-random")) -> str | None:
    """The EndpointPickerConfig text of a picker strategy (None: the default configuration)."""
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
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(known)}, picker:<config file>)")


@contextlib.contextmanager
def stack(strategy: str, n: int, *, model: str, time_scale: float, sim_flags: Sequence[str] = (),
          log_dir: Path | None = None) -> Iterator[LocalStack]:
    """The real stack for `strategy` on fresh servers (devstack.localstack.local_stack)."""
    if strategy in ENVOY_STRATEGIES:
        kw: dict = {"envoy_mode": ENVOY_STRATEGIES[strategy]}
    else:
        kw = {"config_text": picker_config(strategy)}
    with local_stack(n, model=model, time_scale=time_scale, sim_flags=sim_flags, log_dir=log_dir, **kw) as st:
        yield st
