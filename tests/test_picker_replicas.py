"""Several picker replicas: in devstack, Envoy's ext_proc cluster lists each (one replica's
bootstrap unchanged), and a simulator publisher in connect mode reaches every picker's
global socket (tests/e2e/test_picker_replicas_e2e.py runs them together); `epp bench
precise-stack --replicas N` writes its own section of the results file."""

from __future__ import annotations

import time

import pytest
import zmq

from devstack.envoy import bootstrap
from devstack.launch import free_ports
from simulator import AllBlocksCleared
from simulator.kv_events import ZmqKVPublisher, decode_batch


def epp_cluster(config: dict) -> dict:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == "epp")


def hosts(cluster: dict) -> list[int]:
    return [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]


@pytest.mark.parametrize("mode", ["full-duplex", "buffered", "override-host"])
def test_ext_proc_cluster_lists_every_replica_round_robin(mode):
    one = bootstrap(mode, listen_port=1, admin_port=2, epp_port=9002, backends=["127.0.0.1:8000"])
    assert bootstrap(mode, listen_port=1, admin_port=2, epp_port=[9002], backends=["127.0.0.1:8000"]) == one
    assert hosts(epp_cluster(one)) == [9002] and "lb_policy" not in epp_cluster(one)  # the default, as before
    two = epp_cluster(bootstrap(mode, listen_port=1, admin_port=2, epp_port=[9002, 9003], backends=["127.0.0.1:8000"]))
    assert hosts(two) == [9002, 9003] and two["lb_policy"] == "ROUND_ROBIN"
    assert {k: v for k, v in two.items() if k not in ("lb_policy", "load_assignment")} == {
        k: v for k, v in epp_cluster(one).items() if k != "load_assignment"}
    for bad in ([], [9002, 0]):
        with pytest.raises(ValueError, match="needs epp_port"):
            bootstrap(mode, listen_port=1, admin_port=2, epp_port=bad, backends=["127.0.0.1:8000"])


def test_publisher_in_connect_mode_reaches_every_listed_socket():
    ctx = zmq.Context.instance()
    topic = "kv@127.0.0.1:8000@m"
    subs, endpoints = [], [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]
    pub = None
    try:
        for ep in endpoints:  # each picker replica binds its own global socket
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
            sub.bind(ep)
            subs.append(sub)
        pub = ZmqKVPublisher(",".join(endpoints), topic, connect=True)
        got: list[list[int]] = [[], []]
        deadline = time.monotonic() + 10
        while not all(got):  # connections join asynchronously: publish until each socket has a batch
            assert time.monotonic() < deadline, f"batches seen per socket: {got}"
            pub.publish([AllBlocksCleared()])
            for seqs, sub in zip(got, subs, strict=True):
                while sub.poll(20):
                    frames = sub.recv_multipart()
                    assert frames[0] == topic.encode() and decode_batch(frames[2])[1][0]["type"] == "AllBlocksCleared"
                    seqs.append(int.from_bytes(frames[1], "big"))
        pub.publish([AllBlocksCleared()])  # once both are connected, each gets the same batch
        last = pub.seq - 1
        for sub in subs:  # (an earlier batch still in flight may come first)
            seen = []
            while not seen or seen[-1] < last:
                assert sub.poll(5000), f"batch {last} never arrived; saw {seen}"
                seen.append(int.from_bytes(sub.recv_multipart()[1], "big"))
            assert seen[-1] == last
    finally:
        if pub is not None:
            pub.close()
        for sub in subs:
            sub.close()


def test_bench_replicas_section_replaces_its_earlier_run_and_keeps_the_rest(tmp_path):
    from bench.precise_stack import main, write_section

    md = tmp_path / "p.md"
    md.write_text("# Title\n\nCommand: `one replica`\n\n```\ntable 1\n```\n")
    write_section(md, "2 picker replicas", "epp bench precise-stack --replicas 2", "table A")
    write_section(md, "2 picker replicas", "epp bench precise-stack --replicas 2", "table B")
    text = md.read_text()
    assert text.startswith("# Title\n\nCommand: `one replica`\n\n```\ntable 1\n```\n\n## 2 picker replicas\n")
    assert text.count("## 2 picker replicas") == 1 and "table B" in text and "table A" not in text
    assert main(["--replicas", "0"]) == 2 and main(["--replicas", "5"]) == 2
