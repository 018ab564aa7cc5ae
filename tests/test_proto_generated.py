"""The committed stubs are exactly what `make proto` generates from proto/epp_api.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("epp_api_pb2.py", "epp_api_pb2.pyi", "epp_api_pb2_grpc.py")


def test_generated_code_matches_committed(tmp_path):
    # Same invocation as the Makefile's `proto` target, into a temporary directory.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "proto/epp_api.proto"],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_bytes()
        committed = (ROOT / "proto" / name).read_bytes()
        assert fresh == committed, f"proto/{name} is stale: run `make proto`"


def test_stubs_import_as_a_package():
    from proto import epp_api_pb2, epp_api_pb2_grpc

    assert epp_api_pb2.DESCRIPTOR.package == "epp.api.v1"
    assert hasattr(epp_api_pb2_grpc, "EndpointPickerStub")
    assert {m.name for m in epp_api_pb2.DESCRIPTOR.services_by_name["EndpointPicker"].methods} == {
        "ListEndpoints", "Explain"}
