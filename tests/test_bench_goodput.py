"""Goodput benchmark pieces: heterogeneous pools in the cluster simulation, SLO headers on the
request the picker sees, and the goodput arithmetic."""

from __future__ import annotations

import math
import random

import pytest

from bench import goodput
from bench.cluster import EXTRA_ROUTERS, ClusterConfig, Router, simulate
from bench.loadgen import RequestResult
from bench.workloads import DEFAULT_MODEL, LoadSpec, SloMix, WorkItem, WorkloadSpec, generate, make_text
from epp.requestcontrol.producers.latency import endpoint_class
from simulator.hardware import ACCELERATOR_VARIANT_LABEL, GPU_PRODUCT_LABEL, HARDWARE


class Recorder(Router):
    """Round-robin that records what a picker would see: endpoint labels, the parsed request, first tokens."""

    needs_request = True

    def __init__(self, endpoints) -> None:
        self.endpoints = endpoints
        self.next = 0
        self.requests = []
        self.first_tokens = []

    def route(self, item, prompt, request) -> int:
        self.requests.append(request)
        i, self.next = self.next, (self.next + 1) % len(self.endpoints)
        return i

    def first_token(self, server, request) -> None:
        self.first_tokens.append((server, request.request_id))


@pytest.fixture
def recorder():
    made = []
    EXTRA_ROUTERS["test-recorder"] = lambda clock, engines, endpoints, rng: made.append(Recorder(endpoints)) or made[-1]
    yield made
    del EXTRA_ROUTERS["test-recorder"]


def same_prompt_items(n: int, tokens: int, out: int) -> list[WorkItem]:
    text = make_text(random.Random(3), tokens)
    return [WorkItem(i, DEFAULT_MODEL, [{"role": "user", "content": text}], out) for i in range(n)]


def test_slow_class_is_slower_by_its_preset_and_labelled(recorder):
    # One request per server on an idle pool (1 req/s, far apart): server 0 is an H100, server 1 an A100.
    items = same_prompt_items(2, 3000, 101)
    cfg = ClusterConfig(servers=2, hardware=("h100", "a100"))
    r = simulate("test-recorder", items, LoadSpec(rate=0.2), cfg)
    fast, slow = (x for x in r.results)
    h, a = HARDWARE["h100"], HARDWARE["a100"]
    n = r.results[0].prompt_tokens
    # idle engine: TTFT is one prefill step; each later token one decode step of one sequence
    want_ttft = (a.step_overhead + n * a.prefill_time_per_token) / (h.step_overhead + n * h.prefill_time_per_token)
    want_tpot = (a.step_overhead + a.decode_time_per_seq) / (h.step_overhead + h.decode_time_per_seq)
    assert slow.ttft / fast.ttft == pytest.approx(want_ttft, rel=0.01)
    assert goodput.tpot(slow) / goodput.tpot(fast) == pytest.approx(want_tpot, rel=0.01)
    assert want_ttft > 2.0 and want_tpot > 1.4
    # the endpoints the router sees carry the class's accelerator labels; the latency model keys on them
    eps = recorder[0].endpoints
    assert [e.labels[ACCELERATOR_VARIANT_LABEL] for e in eps] == ["h100", "a100"]
    assert [endpoint_class(e.labels) for e in eps] == [h.gpu_product, a.gpu_product]
    assert eps[1].labels[GPU_PRODUCT_LABEL] == "NVIDIA-A100-SXM4-80GB"


def test_pools():
    assert goodput.pool_hardware("mixed", 4) == ("h100", "h100", "a100", "a100")
    assert goodput.pool_hardware("uniform", 3) == ("h100",) * 3
    with pytest.raises(ValueError, match="unknown pool"):
        goodput.pool_hardware("odd", 4)


def test_slo_headers_reach_the_request_and_first_token_is_reported(recorder):
    items = generate(WorkloadSpec("slo_mix", SloMix(chat_fraction=0.5, doc_min_prompt_len=500,
                                                    doc_max_prompt_len=800), num_requests=20, seed=2))
    assert {it.group for it in items} == {0, 1}
    simulate("test-recorder", items, LoadSpec(rate=5.0), ClusterConfig(servers=2))
    rec = recorder[0]
    by_id = {r.request_id: r for r in rec.requests}
    for it in items:
        req = by_id[f"req-{it.index}"]
        want = (500.0, 30.0) if it.group == 0 else (2500.0, 50.0)
        assert (req.slo_ttft_ms, req.slo_tpot_ms) == want
        assert req.headers["x-llm-d-slo-ttft-ms"] == f"{want[0]:g}"
    assert sorted(rid for _, rid in rec.first_tokens) == sorted(by_id)


def result(i: int, ttft: float, e2e: float, out: int, status: int = 200) -> RequestResult:
    return RequestResult(index=i, start=0.0, ttft=ttft, e2e=e2e, output_tokens=out, status=status)


def test_goodput_arithmetic():
    chat = {"x-llm-d-slo-ttft-ms": "500", "x-llm-d-slo-tpot-ms": "30"}
    items = [WorkItem(i, DEFAULT_MODEL, [], 11, group=i % 2, headers=dict(chat)) for i in range(5)]
    results = [
        result(0, 0.5, 0.5 + 10 * 0.0299, 11),      # TTFT exactly at its SLO, TPOT under: met
        result(1, 0.501, 0.6, 11),                  # TTFT over
        result(2, 0.1, 0.1 + 10 * 0.031, 11),       # TPOT over
        result(3, 0.2, 0.3, 11, status=429),        # rejected: missed
        result(4, 0.4, 0.4, 1),                     # one token: no TPOT, TTFT met
    ]
    g = goodput.Goodput.of(results, items, duration=4.0)
    assert (g.requests, g.met, g.rejected) == (5, 2, 1)
    assert g.attainment == pytest.approx(0.4)
    assert g.goodput == pytest.approx(0.5)
    assert g.by_group == {0: pytest.approx(2 / 3), 1: 0.0}
    assert g.tpot_p90_ms > 30.0
    assert goodput.item_slo(WorkItem(9, DEFAULT_MODEL, [], 1)) == goodput.Slo(math.inf, math.inf)


def test_verdict():
    def point(pool, strategy, gp):
        g = goodput.Goodput(10, 10, 1.0, gp, 0.0, 0.0, 0, {})
        return goodput.Point(pool, strategy, 1.0, g, None)

    pts = [point("mixed", "picker", 5.0), point("mixed", "latency", 6.0), point("mixed", "oracle-slo", 9.0),
           point("uniform", "picker", 5.0), point("uniform", "latency", 4.8)]
    assert goodput.verdict(pts).endswith("aim met")
    pts[-1] = point("uniform", "latency", 4.7)
    assert "uniform" in goodput.verdict(pts) and goodput.verdict(pts).endswith("aim NOT met")


def test_command_runs_every_strategy(tmp_path, capsys):
    rc = goodput.main(["--servers", "2", "--requests", "30", "--rates", "4", "--no-plots", "--out", str(tmp_path),
                       "--strategies", "round-robin,picker,latency-lib,oracle-slo", "--doc-min-prompt-len", "500",
                       "--doc-max-prompt-len", "900"])
    assert rc == 0
    text = (tmp_path / "goodput.md").read_text()
    for s in ("round-robin", "picker", "latency-lib", "oracle-slo", "mixed", "uniform"):
        assert s in text
    assert "attainment" in capsys.readouterr().out


def test_latency_plugins_learn_inline_in_virtual_time():
    import threading

    from bench.cluster import PickerRouter
    from epp.requestcontrol.producers.latency import POOL, Target

    made = []
    config = goodput.TUNED_CONFIG.read_text()
    EXTRA_ROUTERS["test-latency"] = lambda clock, engines, endpoints, rng: (
        made.append(PickerRouter(endpoints, config, clock, rng)) or made[-1])
    try:
        items = generate(WorkloadSpec("slo_mix", SloMix(doc_min_prompt_len=500, doc_max_prompt_len=900),
                                      num_requests=150, seed=4))
        r = simulate("test-latency", items, LoadSpec(rate=10.0), ClusterConfig(servers=2, hardware=("h100", "a100")))
    finally:
        del EXTRA_ROUTERS["test-latency"]
    assert all(x.ok for x in r.results)
    producer = made[0].pipeline.plugins["predicted-latency-producer"]
    assert producer.background_training is False
    assert producer._train_thread is None  # noqa: SLF001
    assert not any("trainer" in t.name for t in threading.enumerate())
    # every response was learnt from (TTFT at the first chunk, TPOT at the end; the last few still
    # waiting for the next due training), and fits were published
    model = producer.model
    assert model.samples(POOL, Target.TTFT) + model.samples(POOL, Target.TPOT) + model.pending == 2 * len(items)
    assert model.pending < len(items) // 2
    assert sorted(model.classes()) == sorted({HARDWARE["h100"].gpu_product, HARDWARE["a100"].gpu_product})
    assert model.coefficients(POOL, Target.TTFT) is not None


def test_latency_strategies_run_with_their_objective_and_report_their_model_error(monkeypatch):
    """latency runs the chart's config with no LATENCY_* environment (the default objective, mean,
    as the charts deploy it), latency-p90 with LATENCY_OBJECTIVE_TYPE=quantile (0.9); the caller's
    environment neither leaks in nor is lost; each run reports its model's error per class."""
    import os

    monkeypatch.setenv("LATENCY_OBJECTIVE_TYPE", "quantile")
    monkeypatch.setenv("LATENCY_QUANTILE_ALPHA", "0.7")  # the caller's: neither strategy sees it
    items = generate(WorkloadSpec("slo_mix", SloMix(doc_min_prompt_len=500, doc_max_prompt_len=900),
                                  num_requests=200, seed=4))
    made: list = []
    goodput.register(items, made)
    cfg = ClusterConfig(servers=2, hardware=("h100", "a100"))
    quantiles = {}
    for strategy in ("latency", "latency-p90"):
        with goodput.environment(strategy):
            simulate(strategy, items, LoadSpec(rate=10.0), cfg)
        producer = made[-1].pipeline.plugins["predicted-latency-producer"]
        quantiles[strategy] = producer.model.quantile
        errors = goodput.model_errors(made[-1])
        assert {(HARDWARE[hw].gpu_product, "ttft") for hw in ("h100", "a100")} <= set(errors)
    assert quantiles == {"latency": None, "latency-p90": 0.9}
    assert (os.environ["LATENCY_OBJECTIVE_TYPE"], os.environ["LATENCY_QUANTILE_ALPHA"]) == ("quantile", "0.7")
    assert goodput.model_errors(None) == {}


def test_the_report_explains_a_losing_chart_config_from_the_run_figures():
    from types import SimpleNamespace

    def point(strategy, gp, per_server):
        g = goodput.Goodput(10, 10, 1.0, gp, 0.0, 0.0, 0, {})
        return goodput.Point("mixed", strategy, 1.0, g, SimpleNamespace(per_server=per_server))

    pts = [point("picker", 5.0, [30, 30, 20, 20]), point("latency-p90", 4.0, [25, 25, 25, 25]),
           point("latency", 6.0, [35, 35, 15, 15])]
    why = goodput.explain_latency(pts, goodput.verdict(pts))
    assert why.startswith("Why `latency-p90`"), why
    assert "the H100s served 50% of the requests over these rates, 70% with the default mean objective" in why
    assert "60% with the default config" in why and "LATENCY_OBJECTIVE_TYPE=mean" in why
    pts[1] = point("latency-p90", 6.0, [25, 25, 25, 25])  # it wins: nothing to explain
    assert goodput.explain_latency(pts, goodput.verdict(pts)) == ""
    # the default `latency` losing is not explained as the quantile objective's fault
    assert goodput.explain_latency([pts[0], point("latency", 4.0, [25, 25, 25, 25])],
                                   goodput.verdict(pts)) == ""
