"""`epp serve` as a process: start-up errors, health, metrics names, graceful stop."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.launch import free_port

pytestmark = pytest.mark.e2e

EPP = [sys.executable, "-m", "epp.cli", "serve", "--bind-address", "127.0.0.1", "--endpoints", "127.0.0.1:1"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--config-text", "plugins:\n- type: no-such-scorer\n"], "plugins[0].type"),
    (["--config-text", "plugins: [{type: queue-scorer, bogus: 1}]"], "plugins[0].bogus"),
    (["--config-file", "/nonexistent/epp.yaml"], "--config-file"),
])
def test_config_errors_are_one_line_and_exit_2(flags, message):
    ports = [f"--grpc-port={free_port()}", f"--grpc-health-port={free_port()}", "--metrics-port=0"]
    r = subprocess.run([*EPP, *ports, *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("epp serve: ") and message in line and "Traceback" not in r.stderr


def test_health_metrics_and_graceful_stop(picker):
    p = picker(endpoints=["127.0.0.1:1", "127.0.0.1:2"], extra_flags=["--v=2"])
    with grpc.insecure_channel(f"127.0.0.1:{p.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "liveness", "readiness", "inference-extension",
                        "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    text = p.metrics()
    for name in ("inference_pool_ready_pods", "inference_extension_info", "inference_pool_average_queue_size",
                 "inference_extension_flow_control_pool_saturation", "inference_extension_prefix_indexer_size",
                 "inference_extension_scheduler_e2e_duration_seconds"):
        assert name in text, name
    assert 'inference_pool_ready_pods{name="static"} 2.0' in text
    assert "--v" in p.log()  # ignored reference flags are reported once at start
    p.process.proc.send_signal(2)  # SIGINT: graceful
    assert p.process.proc.wait(20) == 0


def test_cert_path_serves_tls_with_the_given_certificate(picker, e2e_logs):
    from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest
    from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

    from epp.tls import self_signed

    cert, key = self_signed("localhost")
    (e2e_logs.dir / "tls.crt").write_bytes(cert)
    (e2e_logs.dir / "tls.key").write_bytes(key)
    p = picker(endpoints=["127.0.0.1:7"], tls=True, extra_flags=[f"--cert-path={e2e_logs.dir}"])
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(f"127.0.0.1:{p.grpc_port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        msg = ProcessingRequest(request_headers=HttpHeaders(end_of_stream=True, headers=HeaderMap(
            headers=[HeaderValue(key=":method", raw_value=b"GET"), HeaderValue(key=":path", raw_value=b"/v1/models")])))
        replies = ExternalProcessorStub(ch).Process(iter([msg]), timeout=10)
        first = next(iter(replies))
    sets = {h.header.key: h.header.raw_value for h in first.request_headers.response.header_mutation.set_headers}
    assert sets["x-gateway-destination-endpoint"] == b"127.0.0.1:7"
