"""Two picker replicas behind one Envoy (devstack local_stack(replicas=2)), as several EPP
pods behind one Service: Envoy's ext_proc cluster lists both and sends each request's stream
to one of them, round robin.

With the precise configuration of `epp bench precise-stack` (each replica binds its own
global KV-event socket, every server's publisher connects to both), a prefix routed by one
replica is stored on its server, and the server's BlockStored events reach the other replica
too: that replica, which never routed the prefix, scores it on the holder and routes it
there. This is what lets precise routing keep its hit rate when replicas split the traffic.
"""

from __future__ import annotations

import re

import pytest

from bench.precise_stack import strategy_stack
from devstack.launch import wait_until
from devstack.localstack import metric_sum
from tests.e2e.api import prefix_scores
from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SYSTEM = " ".join(f"rule {i}: answer in the voice of a careful clerk number {i * 7}." for i in range(40))


def chat(user: str) -> dict:
    return {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 4,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def handled(picker) -> float:
    return metric_sum(picker.metrics(), "inference_objective_request_total")


def streams_with_events(picker) -> int:
    """Servers whose KV-event batches this replica has applied."""
    return len(re.findall(r'^llm_d_epp_kv_cache_events_messages_received_total\{[^}]*\} [1-9]', picker.metrics(),
                          re.MULTILINE))


def connect_every_stream(st) -> None:
    """A server's publisher connects to each replica's socket; batches published before a
    connection (and its subscription) forms are lost, as ZMQ PUB drops them. Until every
    replica has applied a batch from every server, each server caches a throwaway prompt of
    its own (sent to it directly, not through the pickers, and sharing nothing with SYSTEM)."""
    for k in range(50):
        for i in range(st.sims.n):
            body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 1,
                    "messages": [{"role": "user", "content": f"warm-up {k} for server {i}: " + "tick " * 120}]}
            assert post(st.sims.url(i) + "/v1/chat/completions", body)[0] == 200
        try:
            wait_until(lambda: all(streams_with_events(p) == st.sims.n for p in st.pickers), 2,
                       "every replica applying every server's events")
            return
        except TimeoutError:
            continue
    pytest.fail("the servers' KV-event streams never reached both replicas")


def test_two_replicas_split_requests_and_both_route_a_prefix_to_its_holder(e2e_logs):
    with strategy_stack("precise-nospec", 3, 4096, 10.0, replicas=2, log_dir=e2e_logs.dir) as st:
        a, b = st.pickers
        assert st.picker is a and a.grpc_port != b.grpc_port and a.api_port != b.api_port
        connect_every_stream(st)
        warm = st.sims.served()
        status, _, text = post(st.url + "/v1/chat/completions", chat("first question"))
        assert status == 200, text
        first = a if handled(a) == 1 else b
        other = b if first is a else a
        assert (handled(first), handled(other)) == (1, 0)
        holder = next(h for h, n, w in zip(st.sims.hostports, st.sims.served(), warm, strict=True) if n - w == 1)

        # the holder's events reach both replicas; the other never routed this prefix
        probe = chat("a question nobody asked yet")
        for p in (first, other):
            wait_until(lambda p=p: (s := prefix_scores(p.api_port, probe, path="/v1/chat/completions"))[holder] > 0.5
                       and sorted(s.values())[:2] == [0.0, 0.0], 20, f"replica {p.grpc_port} sees the stored prefix")
        assert metric_sum(other.metrics(), "inference_objective_request_total") == 0

        before = st.sims.served()
        for k in range(8):
            status, _, text = post(st.url + "/v1/chat/completions", chat(f"follow-up {k}"))
            assert status == 200, text
        after = st.sims.served()
        # both replicas routed, and every request went to the holder
        assert handled(a) > 1 and handled(b) > 1 and handled(a) + handled(b) == 9
        assert [y - x for x, y in zip(before, after, strict=True)] == [
            8 if h == holder else 0 for h in st.sims.hostports]
    for p in st.pickers:
        assert not p.process.alive()
    assert not st.sims.process.alive() and not st.envoy.process.alive()
