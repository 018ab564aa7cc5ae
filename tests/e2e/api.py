"""The e2e tests' side of the picker: a static endpoints file for it to read, and its project
API (Explain dry runs, ListEndpoints) on the api port.

    path = write_endpoints(dir / "endpoints.json", [endpoint("sim-0", "127.0.0.1:8000")],
                           objectives=objectives(batch=-1))
    resp, endpoints = explain(p.api_port, {"model": "m1", "prompt": "hi"})
    scorer_scores(resp, "prefix-cache-scorer", hostports(endpoints))   # host:port -> raw score
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc


# --------------------------------------------------------------------------- endpoints file
def endpoint(name: str, where: str | int, labels: Mapping[str, str] | None = None, **fields: Any) -> dict:
    """One entry of an endpoints file: `where` is "host:port", or a port on 127.0.0.1."""
    host, port = ("127.0.0.1", where) if isinstance(where, int) else (where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1]))
    entry = {"name": name, **fields, "address": host, "port": port}
    if labels:
        entry["labels"] = dict(labels)
    return entry


def by_port(hostports: Iterable[str]) -> list[dict]:
    """Entries named sim-<port> on 127.0.0.1, one per "host:port"."""
    return [endpoint(f"sim-{hp.rsplit(':', 1)[1]}", int(hp.rsplit(":", 1)[1])) for hp in hostports]


def objectives(**priorities: int) -> list[dict]:
    """The file's objectives section: name -> priority."""
    return [{"name": name, "priority": priority} for name, priority in priorities.items()]


def write_endpoints(path: Path, endpoints: Iterable[dict], **sections: Any) -> str:
    """Write an endpoints file (JSON, which the YAML loader reads too) with its other sections
    (objectives=..., modelRewrites=...). Rename-replace, as editors and ConfigMap updates do,
    so a picker already watching the file never reads half of it. Returns the path."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"endpoints": list(endpoints), **sections}))
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- project API
def list_endpoints(api_port: int, timeout: float = 5) -> pb.ListEndpointsResponse:
    with grpc.insecure_channel(f"127.0.0.1:{api_port}") as ch:
        return pb_grpc.EndpointPickerStub(ch).ListEndpoints(pb.ListEndpointsRequest(), timeout=timeout)


def explain(api_port: int, body: dict, headers: Mapping[str, str] | None = None, *,
            path: str = "/v1/completions") -> tuple[pb.ExplainResponse, pb.ListEndpointsResponse]:
    """The picker's dry run for `body` (which must not fail) and its endpoints as it answered."""
    with grpc.insecure_channel(f"127.0.0.1:{api_port}") as ch:
        stub = pb_grpc.EndpointPickerStub(ch)
        resp = stub.Explain(pb.ExplainRequest(body=json.dumps(body).encode(),
                                              headers={":path": path, **(headers or {})}), timeout=10)
        endpoints = stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10)
    assert not resp.error_code, resp.error_message
    return resp, endpoints


def hostports(endpoints: pb.ListEndpointsResponse) -> dict[str, str]:
    """Endpoint name -> "address:port"."""
    return {e.name: f"{e.address}:{e.port}" for e in endpoints.endpoints}


def scorer_scores(resp: pb.ExplainResponse, scorer: str, names: Mapping[str, str] | None = None) -> dict[str, float]:
    """The first scorer of type `scorer`'s raw score per endpoint (renamed through `names`
    where it has the name); {} when no profile ran it."""
    for profile in resp.profiles:
        for s in profile.scorers:
            if s.type == scorer:
                return {(names or {}).get(x.endpoint, x.endpoint): x.score for x in s.scores}
    return {}


def prefix_scores(api_port: int, body: dict, *, path: str = "/v1/completions") -> dict[str, float]:
    """host:port -> the prefix-cache-scorer's raw score for `body` (Explain dry run)."""
    resp, endpoints = explain(api_port, body, path=path)
    return scorer_scores(resp, "prefix-cache-scorer", hostports(endpoints))
