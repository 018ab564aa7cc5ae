"""`epp bench soak`: the request mix, the verdict, a short run through the real stack that must
leave nothing in flight, and Ctrl-C stopping every process."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from bench import soak
from tests.processes import interrupt_when

ROOT = Path(__file__).resolve().parent.parent


def test_plan_is_seeded_and_covers_every_kind():
    a, b = soak.plan(2000, 7, list(soak.REQUEST_MIX)), soak.plan(2000, 7, list(soak.REQUEST_MIX))
    assert a == b and set(a) == set(soak.REQUEST_MIX)
    assert soak.plan(2000, 8, list(soak.REQUEST_MIX)) != a
    assert "oversized-body" not in soak.plan(500, 1, [k for k in soak.REQUEST_MIX if k != "oversized-body"])


def test_exchanges_are_cut_where_their_kind_says():
    rng = random.Random(0)
    ex = {k: soak.make_exchange(k, 3, rng, "m", 1000) for k in soak.REQUEST_MIX}
    assert ex["cancel-before-body"].send_body == 0 and not ex["cancel-before-body"].read_response
    mid = ex["cancel-mid-body"]
    assert 0 < mid.send_body < len(mid.body) and not mid.read_response
    assert ex["cancel-mid-response"].stop_after_first_chunk and b'"stream": true' in ex["cancel-mid-response"].body
    assert len(ex["oversized-body"].body) > 1000
    assert ex["repeated-headers"].head.count(b"x-request-id:") == 2
    assert json.loads(ex["unknown-model"].body)["model"] == "soak-unknown-3"
    assert json.loads(ex["absurd-max-tokens"].body)["max_tokens"] == soak.ABSURD_MAX_TOKENS[3]
    for e in ex.values():
        assert f"content-length: {len(e.body)}".encode() in e.head


def test_verdict_fails_on_anything_left_in_flight_or_rss_growth():
    ok = soak.Outcomes("native", in_flight_requests=0, in_flight_tokens=0, running_gauge=0, answering=True,
                       rss_warm_kib=60 * 1024, rss_end_kib=70 * 1024)
    assert ok.failures(20) == []
    assert ok.failures(5) and "RSS grew 10.0 MiB" in ok.failures(5)[0]
    leaked = soak.Outcomes("grpcio", in_flight_requests=2, in_flight_tokens=0, running_gauge=0, answering=True)
    assert "2 requests" in leaked.failures(20)[0]
    assert soak.Outcomes("grpcio", in_flight_requests=0, in_flight_tokens=0, running_gauge=1,
                         answering=True).failures(20)
    assert len(soak.Outcomes("x").failures(20)) == 3  # counts never read (-1) and no answer fail too


@pytest.mark.e2e
def test_short_soak_leaves_nothing_in_flight():
    out = soak.soak_one("native", 300, servers=2, concurrency=16, seed=3, time_limit=120, warmup=20,
                        time_scale=20, show_progress=False)
    assert out.sent == 300
    assert (out.in_flight_requests, out.in_flight_tokens, out.running_gauge) == (0, 0, 0)
    assert out.answering and out.tracebacks == 0
    assert set(out.counts["completion"]) == {"HTTP 200"} and set(out.counts["chat-stream"]) == {"HTTP 200"}
    assert set(out.counts["bad-json"]) == {"HTTP 400"}
    assert set(out.counts["cancel-mid-body"]) == {"client-cancelled"}
    assert out.rss_start_kib > 0 and out.rss_end_kib > 0


@pytest.mark.e2e
def test_ctrl_c_stops_every_process(tmp_path):
    # The progress line ("soak grpcio  [...] n/1000000"): the stack is up and requests are going out.
    out = interrupt_when([sys.executable, "-m", "epp.cli", "bench", "soak", "--requests", "1000000",
                          "--concurrency", "2", "--transports", "grpcio", "--out", str(tmp_path)],
                         "/1000000 ", tmp_path / "soak.log", ROOT)
    assert "interrupted; every process stopped" in out
