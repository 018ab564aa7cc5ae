"""devstack's starts of the simulator and the picker on free ports: a port found free can be
taken before the process binds it (TOCTOU, e.g. as another connection's ephemeral source
port); the start is retried on fresh ports instead of failing the test that asked for it."""

from __future__ import annotations

import socket

import devstack.localstack as localstack
from devstack.launch import http_ok
from devstack.localstack import start_sims


def test_a_simulator_start_that_loses_its_port_race_starts_again_on_other_ports(tmp_path, monkeypatch):
    """free_port_range's ports can be taken before `epp sim` binds them (TOCTOU); the start
    is retried on fresh ports instead of failing the test that asked for the servers."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks: list[int] = []
    real = localstack.free_port_range

    def racy(n: int) -> int:  # the first range handed out is already in use
        picks.append(taken.getsockname()[1] if not picks else real(n))
        return picks[-1]

    monkeypatch.setattr(localstack, "free_port_range", racy)
    try:
        s = start_sims(1, model="m", log_dir=tmp_path)
        try:
            assert len(picks) == 2 and s.ports == [picks[1]]
            assert http_ok(s.url(0) + "/health")
            lost = (tmp_path / f"sim-{picks[0]}.log").read_text()  # the first try: a clean error, nothing left open
            assert "address already in use" in lost and "Unclosed" not in lost
        finally:
            s.stop()
    finally:
        taken.close()


def test_a_picker_start_that_loses_its_port_race_starts_again_on_other_ports(tmp_path, monkeypatch):
    """The picker's four ports, the first set handed out taken before it binds: `epp serve`
    stops with an address-in-use start-up error and is started again on fresh ports."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks: list[list[int]] = []
    real = localstack.free_ports

    def racy(n: int) -> list[int]:  # the first set's metrics port is already in use
        picks.append(real(n))
        if len(picks) == 1:
            picks[0][2] = taken.getsockname()[1]
        return picks[-1]

    monkeypatch.setattr(localstack, "free_ports", racy)
    try:
        p = localstack.start_picker(log_dir=tmp_path, endpoints=["127.0.0.1:7"])
        try:
            assert len(picks) == 2 and (p.grpc_port, p.metrics_port) == (picks[1][0], picks[1][2])
            assert "llm_d_epp" in p.metrics() or "inference_" in p.metrics()
        finally:
            p.stop()
    finally:
        taken.close()


def test_an_envoy_start_that_loses_its_port_race_starts_again_on_other_ports(monkeypatch):
    """Envoy exits when its listener cannot bind ("cannot bind ...: Address already in use"):
    said at once, not after the readiness timeout, and started again on a fresh port."""
    import devstack.envoy as envoy

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks: list[int] = []
    real = envoy.free_port

    def racy() -> int:  # the first port handed out (the listener's) is already in use
        picks.append(taken.getsockname()[1] if not picks else real())
        return picks[-1]

    monkeypatch.setattr(envoy, "free_port", racy)
    try:
        e = envoy.start_envoy("full-duplex", epp_port=1, timeout=20)
        try:
            # picks: the first try's listener (taken) and admin ports, then the second try's
            assert len(picks) == 4 and (e.port, e.admin_port) == (picks[2], picks[3])
        finally:
            e.stop()
    finally:
        taken.close()
