"""The project gRPC API over a real gRPC server on 127.0.0.1, and the `epp endpoints` /
`epp explain` clients against it (plaintext and TLS with a self-signed certificate)."""

import asyncio
import json
import subprocess
import time

import grpc
import pytest

from devstack.launch import free_port
from epp import apicli
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.errors import InferenceError
from epp.framework import ENGINE_TYPE_LABEL, InferenceRequest, Metrics
from epp.handlers.api import (
    MAX_ADAPTERS,
    MAX_PAGE_SIZE,
    MAX_RESPONSE_BYTES,
    MAX_VALUE_CHARS,
    ApiServicer,
    ExplainResult,
    add_api_servicer,
)
from epp.scheduling.scheduler import FilterTrace, ProfileTrace, SchedulingTrace, ScorerTrace
from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc


def make_datastore(now: float) -> Datastore:
    ds = Datastore()
    a = ds.upsert(EndpointSpec(name="vllm-a", address="10.0.0.1", port=8000,
                               labels={ENGINE_TYPE_LABEL: "vllm", "llm-d.ai/role": "decode"}))
    ds.upsert(EndpointSpec(name="vllm-b", address="fd00::2", port=8001))
    ds.set_metrics(a, Metrics(waiting_queue_size=3, running_requests_size=5, kv_cache_usage_percent=0.25,
                              running_lora_adapters=frozenset({"sql", "chat"}), waiting_lora_adapters=frozenset({"x"}),
                              max_active_models=4, block_size=16, num_gpu_blocks=2048, update_time=now - 0.5, ok=True))
    a.in_flight, a.in_flight_tokens = 2, 700
    ds.synced = True
    return ds


def canned_explain(headers, body):
    """Stands in for Director.explain: echoes what it was given through the result."""
    doc = json.loads(body)
    if doc.get("model") == "reject":
        raise InferenceError("ResourceExhausted", "every endpoint was filtered out")
    if doc.get("model") == "crash":
        raise RuntimeError("bug")
    request = InferenceRequest(request_id="r1", target_model=headers.get("x-gateway-model-name-rewrite", doc["model"]),
                               incoming_model=doc["model"], kind="completions", prompt_text=doc.get("prompt", ""),
                               headers=headers, objective=headers.get("x-gateway-inference-objective", ""), priority=-1)
    profile = ProfileTrace(
        name="default", candidates=["vllm-a", "vllm-b"],
        filters=[FilterTrace(name="decode-filter", type="decode-filter", kept=["vllm-a", "vllm-b"])],
        scorers=[ScorerTrace(name="queue-scorer", type="queue-scorer", weight=2.0, scores={"vllm-b": 1.0, "vllm-a": 0.5})],
        totals={"vllm-a": 1.0, "vllm-b": 2.0}, picker="max-score-picker", picked=["vllm-b"])
    return ExplainResult(request=request, candidates=["10.0.0.1:8000", "[fd00::2]:8001"],
                         trace=SchedulingTrace(profiles=[profile], primary_profile="default"),
                         primary_profile="default", targets=["[fd00::2]:8001"], headers={"x-test": "1"})


class Server:
    def __init__(self, servicer, credentials=None):
        self.servicer = servicer
        self.credentials = credentials
        self.port = free_port()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])

    async def __aenter__(self):
        add_api_servicer(self.server, self.servicer)
        addr = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.server.add_insecure_port(addr)
        else:
            self.server.add_secure_port(addr, self.credentials)
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(None)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def now():
    return time.monotonic()


async def test_list_endpoints(now):
    ds = make_datastore(now)
    async with Server(ApiServicer(ds, canned_explain, clock=lambda: now)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            resp = await pb_grpc.EndpointPickerStub(channel).ListEndpoints(pb.ListEndpointsRequest(), timeout=10)
    assert resp.synced and [e.name for e in resp.endpoints] == ["vllm-a", "vllm-b"]
    a, b = resp.endpoints
    assert (a.address, a.port, dict(a.labels)) == ("10.0.0.1", 8000, {ENGINE_TYPE_LABEL: "vllm", "llm-d.ai/role": "decode"})
    m = a.metrics
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage, m.max_lora) == (3, 5, 0.25, 4)
    assert list(m.running_lora_adapters) == ["chat", "sql"] and list(m.waiting_lora_adapters) == ["x"]
    assert (m.block_size, m.num_gpu_blocks, m.ok) == (16, 2048, True)
    assert m.age_seconds == pytest.approx(0.5)
    assert (a.in_flight_requests, a.in_flight_tokens) == (2, 700)
    assert b.address == "fd00::2" and b.metrics.age_seconds == -1 and not b.metrics.ok


async def test_explain_converts_the_trace_and_errors(now):
    ds = make_datastore(now)
    async with Server(ApiServicer(ds, canned_explain)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            stub = pb_grpc.EndpointPickerStub(channel)
            resp = await stub.Explain(pb.ExplainRequest(
                body=b'{"model": "m", "prompt": "hi"}',
                headers={"X-Gateway-Inference-Objective": "batch", ":path": "/v1/completions"}), timeout=10)
            rejected = await stub.Explain(pb.ExplainRequest(body=b'{"model": "reject"}'), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as crash:
                await stub.Explain(pb.ExplainRequest(body=b'{"model": "crash"}'), timeout=10)
            # The server survives a failing explain.
            assert (await stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10)).endpoints
    r = resp.request
    assert (r.incoming_model, r.kind, r.objective, r.priority, r.prompt_chars) == ("m", "completions", "batch", -1, 2)
    assert list(resp.candidates) == ["vllm-a", "vllm-b"] and list(resp.targets) == ["vllm-b"]  # ip:port -> names
    (p,) = resp.profiles
    assert (p.name, p.picker, list(p.picked), list(p.filters[0].kept)) == (
        "default", "max-score-picker", ["vllm-b"], ["vllm-a", "vllm-b"])
    assert p.scorers[0].weight == 2.0
    assert [(s.endpoint, s.score) for s in p.scorers[0].scores] == [("vllm-a", 0.5), ("vllm-b", 1.0)]  # candidate order
    assert [(s.endpoint, s.score) for s in p.totals] == [("vllm-a", 1.0), ("vllm-b", 2.0)]
    assert resp.primary_profile == "default" and dict(resp.headers) == {"x-test": "1"} and not resp.error_code
    assert (rejected.error_code, rejected.http_status) == ("ResourceExhausted", 429)
    assert rejected.error_message == "every endpoint was filtered out" and not rejected.profiles
    assert crash.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError: bug" in crash.value.details()


async def test_explain_with_the_real_director_has_no_side_effects(now):
    from epp.assembly import load_plugin_set
    from epp.flowcontrol.admission import AdmissionController
    from epp.requestcontrol.director import Director

    ds = make_datastore(now)
    ds.set_metrics(ds.get("vllm-b"), Metrics(waiting_queue_size=0, kv_cache_usage_percent=0.1, update_time=now, ok=True))
    plugins = load_plugin_set(None)  # default profile: queue 2, kv 2, prefix 3, max-score
    director = Director(ds, plugins, admission=AdmissionController(plugins.saturation_detector))
    body = json.dumps({"model": "m", "prompt": "the same long shared prefix " * 40}).encode()
    async with Server(ApiServicer(ds, director.explain)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            stub = pb_grpc.EndpointPickerStub(channel)
            first = await stub.Explain(pb.ExplainRequest(body=body, headers={":path": "/v1/completions"}), timeout=10)
            again = await stub.Explain(pb.ExplainRequest(body=body, headers={":path": "/v1/completions"}), timeout=10)
            bad = await stub.Explain(pb.ExplainRequest(body=b"not json"), timeout=10)
    (p,) = first.profiles
    scorers = {s.name: s for s in p.scorers}
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= set(scorers)
    assert scorers["queue-scorer"].weight == 2.0 and scorers["prefix-cache-scorer"].weight == 3.0
    assert {s.endpoint: s.score for s in scorers["queue-scorer"].scores} == {"vllm-a": 0.0, "vllm-b": 1.0}
    assert list(first.targets) == ["vllm-b"] == list(p.picked)
    # Nothing was recorded: the same prompt still has no prefix hit, counters untouched.
    assert all(s.score == 0.0 for s in {s.name: s for s in again.profiles[0].scorers}["prefix-cache-scorer"].scores)
    assert ds.get("vllm-b").in_flight == 0 and ds.get("vllm-a").in_flight == 2
    assert (bad.error_code, bad.http_status) == ("BadRequest", 400)


# ---------------------------------------------------------------------------- CLI
async def run_cli(capsys, *argv):
    code = await asyncio.to_thread(apicli.main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_cli_endpoints_table_and_json(now, capsys):
    ds = make_datastore(now)
    async with Server(ApiServicer(ds, canned_explain, clock=lambda: now)) as srv:
        code, out, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["NAME", "ADDRESS", "WAIT", "RUN"]
        row_a = lines[1].split()
        assert row_a[:6] == ["vllm-a", "10.0.0.1:8000", "3", "5", "25.0", "chat,sql/x/4"]
        assert row_a[6:11] == ["2048x16", "0.50s", "yes", "2", "700"]
        assert lines[2].split()[:2] == ["vllm-b", "[fd00::2]:8001"] and "never" in lines[2]
        assert lines[-1] == "2 endpoints"

        code, out, _ = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure", "--json")
        doc = json.loads(out)
        assert code == 0 and doc["endpoints"][0]["metrics"]["num_gpu_blocks"] == "2048"


async def test_cli_explain_readable(now, capsys, tmp_path):
    ds = make_datastore(now)
    async with Server(ApiServicer(ds, canned_explain)) as srv:
        code, out, err = await run_cli(capsys, "explain", "--addr", srv.addr, "--insecure", "--model", "m",
                                       "--prompt", "hello", "--header", "x-gateway-inference-objective=batch")
        assert code == 0, err
        assert out.splitlines() == [
            "request: model m, completions, priority -1, objective batch, prompt 5 chars",
            "candidates: vllm-a, vllm-b",
            "profile default:",
            "  filter decode-filter kept vllm-a, vllm-b",
            "  scorer queue-scorer (w=2): vllm-a=0.5 vllm-b=1",
            "  totals: vllm-a=1 vllm-b=2",
            "  picker max-score-picker picked vllm-b",
            "picked vllm-b (profile default)",
            "sets header x-test: 1",
        ]
        body = tmp_path / "req.json"
        body.write_text(json.dumps({"model": "reject", "messages": [{"role": "user", "content": "x"}]}))
        code, out, _ = await run_cli(capsys, "explain", "--addr", srv.addr, "--insecure", "--body-file", str(body))
        assert code == 0 and out.strip() == "error: ResourceExhausted (HTTP 429) - every endpoint was filtered out"

    code, _, err = await run_cli(capsys, "explain", "--addr", srv.addr, "--insecure", "--model", "m")
    assert code == 2 and "--prompt" in err
    code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure", "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in err


def self_signed(tmp_path):
    """A certificate naming the picker's Service, not 127.0.0.1 (as a self-signed picker cert does)."""
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=epp-picker",
                    "-addext", "subjectAltName=DNS:epp-picker.default.svc"],
                   check=True, capture_output=True, timeout=30)
    return key.read_bytes(), cert.read_bytes()


async def test_cli_tls_verifies_the_servers_certificate(now, capsys, tmp_path):
    key, cert = self_signed(tmp_path)
    ca = tmp_path / "tls.crt"
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "tls.crt"
    self_signed(tmp_path / "other")
    creds = grpc.ssl_server_credentials([(key, cert)])
    async with Server(ApiServicer(make_datastore(now), canned_explain), credentials=creds) as srv:
        # TLS is the default and verifies: an unknown self-signed certificate is refused
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--timeout", "3")
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err and "--ca-file" in err
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--ca-file", str(other), "--timeout", "3")
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err  # signed by someone else
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--ca-file", str(ca), "--timeout", "3")
        assert code == 1  # the right certificate, but it does not name 127.0.0.1
        code, out, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--tls", "--ca-file", str(ca),
                                       "--server-name", "epp-picker.default.svc")
        assert code == 0, err
        assert out.splitlines()[1].startswith("vllm-a")
        code, out, err = await run_cli(capsys, "explain", "--addr", srv.addr, "--ca-file", str(ca),
                                       "--server-name", "epp-picker.default.svc", "--model", "m", "--prompt", "x")
        assert code == 0 and "picked vllm-b" in out, err
        # only when asked for explicitly: trust whatever the server presents
        code, out, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure-skip-verify")
        assert code == 0 and out.splitlines()[1].startswith("vllm-a"), err
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure", "--timeout", "2")
        assert code == 1  # plaintext against a TLS server fails cleanly
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure", "--ca-file", str(ca))
        assert code == 2 and "need TLS" in err
        code, _, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--ca-file", str(tmp_path / "none"))
        assert code == 1 and "--ca-file: cannot read" in err


async def test_cli_verifies_the_pickers_generated_certificate(now, capsys, tmp_path):
    from epp.tls import self_signed as generated

    cert, key = generated()
    (tmp_path / "picker.crt").write_bytes(cert)
    creds = grpc.ssl_server_credentials([(key, cert)])
    async with Server(ApiServicer(make_datastore(now), canned_explain), credentials=creds) as srv:
        for host in ("127.0.0.1", "localhost"):  # both named by the certificate
            code, out, err = await run_cli(capsys, "endpoints", "--addr", f"{host}:{srv.port}",
                                           "--ca-file", str(tmp_path / "picker.crt"))
            assert code == 0 and out.splitlines()[-1] == "2 endpoints", err


async def test_many_endpoints_with_huge_labels_are_paged_and_cut(now, capsys):
    """120 MB of labels over 2,000 endpoints and one 5 MB label value: every page stays under
    MAX_RESPONSE_BYTES (a gRPC client refuses more than 4 MiB) and `epp endpoints` lists all."""
    ds = Datastore()
    labels = {f"pad-{k}": "v" * 3000 for k in range(20)}  # 10 MB even when each value is cut
    for i in range(2000):
        ds.upsert(EndpointSpec(name=f"ep-{i:05d}", address="10.1.0.1", port=1000 + i, labels=labels))
    ds.upsert(EndpointSpec(name="ep-huge", address="10.1.0.2", port=80, labels={"huge": "h" * (5 << 20)}))
    many = ds.get("ep-00007")
    ds.set_metrics(many, Metrics(running_lora_adapters=frozenset(f"adapter-{i}" for i in range(500)),
                                 waiting_lora_adapters=frozenset({"w" * 100_000}), ok=True, update_time=now))
    ds.synced = True
    async with Server(ApiServicer(ds, canned_explain, clock=lambda: now)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            stub = pb_grpc.EndpointPickerStub(channel)
            token, names, sizes = "", [], []
            while True:
                page = await stub.ListEndpoints(pb.ListEndpointsRequest(page_token=token), timeout=10)
                assert page.ByteSize() <= MAX_RESPONSE_BYTES and page.synced
                names += [e.name for e in page.endpoints]
                sizes.append(len(page.endpoints))
                token = page.next_page_token
                if not token:
                    break
            small = await stub.ListEndpoints(pb.ListEndpointsRequest(page_size=3, page_token="ep-00005"), timeout=10)
        code, out, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure")
        assert code == 0, err
        code, js, err = await run_cli(capsys, "endpoints", "--addr", srv.addr, "--insecure", "--json")
        assert code == 0, err
    assert names == sorted(e.name for e in ds.endpoints()) and len(sizes) >= 10
    assert max(sizes) < MAX_PAGE_SIZE  # cut by bytes, not by count
    assert [e.name for e in small.endpoints] == ["ep-00006", "ep-00007", "ep-00008"]
    assert small.next_page_token == "ep-00008"
    m = small.endpoints[1]
    assert small.endpoints[1].truncated and len(m.metrics.running_lora_adapters) == MAX_ADAPTERS
    assert len(m.metrics.waiting_lora_adapters[0]) <= MAX_VALUE_CHARS + 3
    lines = out.splitlines()
    assert lines[-1] == "2001 endpoints" and len(lines) == 1 + 2001 + 1  # header, rows, count
    huge_row = next(line for line in lines if line.startswith("ep-huge"))
    assert huge_row.endswith("(cut)") and len(huge_row) < 4000  # not 5 MB
    assert len(json.loads(js)["endpoints"]) == 2001


async def test_explain_is_cut_to_fit_the_message_limit(now):
    names = [f"endpoint-with-a-long-name-{i:06d}-" + "x" * 60 for i in range(40_000)]  # ~4 MB of names

    def explain(headers, body):
        profile = ProfileTrace(name="default", candidates=names,
                               filters=[FilterTrace(name="f", type="f", kept=names)],
                               scorers=[ScorerTrace(name="s", type="s", weight=1.0, scores=dict.fromkeys(names, 1.0))],
                               totals=dict.fromkeys(names, 1.0), picker="p", picked=[names[-1]])
        return ExplainResult(candidates=names, trace=SchedulingTrace(profiles=[profile], primary_profile="default"),
                             targets=[names[-1]], error_message="e" * 100_000)

    async with Server(ApiServicer(make_datastore(now), explain)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            resp = await pb_grpc.EndpointPickerStub(channel).Explain(pb.ExplainRequest(body=b"{}"), timeout=20)
    assert resp.truncated and resp.ByteSize() <= MAX_RESPONSE_BYTES
    assert list(resp.targets) == [names[-1]] and list(resp.profiles[0].picked) == [names[-1]]  # picks kept whole
    assert 0 < len(resp.candidates) < len(names) and len(resp.error_message) <= 4096 + 3
    assert "(per-endpoint lists cut to fit the response)" in apicli.format_explain(resp)


async def test_explain_accepts_an_async_callable(now):
    async def explain(headers, body):
        await asyncio.sleep(0)
        return ExplainResult(error_code="ServiceUnavailable", error_message="no candidate endpoints")

    async with Server(ApiServicer(make_datastore(now), explain)) as srv:
        async with grpc.aio.insecure_channel(srv.addr) as channel:
            resp = await pb_grpc.EndpointPickerStub(channel).Explain(pb.ExplainRequest(body=b"{}"), timeout=10)
    assert (resp.error_code, resp.http_status, resp.error_message) == (
        "ServiceUnavailable", 503, "no candidate endpoints")
