"""session-affinity-filter (strategy session_id) through the real Envoy in front of
`epp serve` and real `epp sim` servers: requests with the same x-session-id stick to one
server while different sessions spread. The profile's only scorer is active-request-scorer:
the sessions' first (long) requests are sent one at a time, each once the previous is in
flight, so they spread by in-flight count (one per server); the follow-ups are sent when
nothing is in flight, so every server ties and, without the filter, each would land at
random (all of a session's five follow-ups on its first server: 3^-5 per session). Every
landing is counted by the servers themselves; synchronisation by polling, never sleeping."""

from __future__ import annotations

import base64
import threading

import pytest

from devstack.launch import wait_until
from tests.e2e.conftest import SimServers, post
from tests.e2e.test_scenarios import in_flight

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """\
plugins:
- type: session-affinity-filter
  parameters: {strategy: session_id}
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: session-affinity-filter
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""
SERVERS, FOLLOW_UPS = 3, 5


def send(sims: SimServers, url: str, headers: dict[str, str], prompt: str) -> tuple[int, dict[str, str]]:
    """One short request; (the index of the server that counted it, the response headers)."""
    before = sims.served()
    status, response_headers, _ = post(url, {"model": "m1", "prompt": prompt, "max_tokens": 2}, headers=headers)
    assert status == 200
    after: list[float] = []

    def counted() -> bool:
        after[:] = sims.served()
        return sum(after) - sum(before) == 1

    wait_until(counted, 20, "the request counted by a server", interval=0.02)
    return next(i for i in range(sims.n) if after[i] - before[i] == 1), response_headers


def test_same_session_sticks_different_sessions_spread(sim_servers, picker, envoy):
    sims = sim_servers(SERVERS, time_scale=1.0)
    p = picker(endpoints=sims.hostports, config_text=CONFIG, extra_flags=["--allow-experimental-plugins"])
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    sessions = [f"session-{k}" for k in range(SERVERS)]
    statuses: list[int] = []
    threads = []
    for k, sid in enumerate(sessions):
        body = {"model": "m1", "prompt": f"first turn of {sid}", "max_tokens": 400}
        t = threading.Thread(target=lambda b=body, s=sid: statuses.append(
            post(url, b, headers={"x-session-id": s}, timeout=60)[0]))
        t.start()
        threads.append(t)
        wait_until(lambda n=k + 1: sum(in_flight(p).values()) == n, 20, f"session {k} in flight",
                   interval=0.02)
    assert sorted(in_flight(p).values()) == [1] * SERVERS  # spread one per server
    for t in threads:
        t.join(60)
    assert statuses == [200] * SERVERS
    wait_until(lambda: sum(in_flight(p).values()) == 0, 20, "nothing in flight", interval=0.05)

    where: dict[str, list[int]] = {sid: [] for sid in sessions}
    for turn in range(FOLLOW_UPS):
        for sid in sessions:
            server, headers = send(sims, url, {"x-session-id": sid}, f"turn {turn} of {sid}")
            assert "x-session-token" not in headers  # session_id writes nothing back
            where[sid].append(server)
    for sid, servers in where.items():
        assert len(set(servers)) == 1, (sid, servers)  # sticks
    assert len({servers[0] for servers in where.values()}) == SERVERS, where  # different sessions spread
    # a request with no session id is not pinned: it still routes
    assert post(url, {"model": "m1", "prompt": "no session", "max_tokens": 2})[0] == 200


ENCODED_CONFIG = CONFIG.replace("  parameters: {strategy: session_id}\n", "")


def test_encoded_endpoint_header_round_trips_through_envoy_and_pins(sim_servers, picker, envoy):
    """The default strategy: the response carries x-session-token = base64("namespace/name") of
    the server that answered; echoing it pins every follow-up there (ties otherwise: random)."""
    sims = sim_servers(SERVERS, time_scale=1.0)
    p = picker(endpoints=sims.hostports, config_text=ENCODED_CONFIG, extra_flags=["--allow-experimental-plugins"])
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    first, headers = send(sims, url, {}, "first turn")
    token = headers.get("x-session-token", "")
    assert base64.standard_b64decode(token).decode().startswith("default/")
    follow_ups = [send(sims, url, {"x-session-token": token}, f"turn {k}") for k in range(FOLLOW_UPS)]
    assert [server for server, _ in follow_ups] == [first] * FOLLOW_UPS
    assert {h.get("x-session-token") for _, h in follow_ups} == {token}
    # a token naming no endpoint of the pool pins nothing: the request still routes
    assert post(url, {"model": "m1", "prompt": "x", "max_tokens": 2},
                headers={"x-session-token": base64.b64encode(b"default/gone").decode()})[0] == 200
