"""Conformance-test plugins of the upstream suite (reference protocol.md)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest, NamedPlugin, ResponseInfo
from epp.netaddr import split_list

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_HEADER = "x-conformance-test-served-endpoint"


def parse_selection(value: str) -> tuple[set[str], set[tuple[str, int]]]:
    """Comma-separated `IP` or `IP:port` (IPv6 bare, or bracketed with optional port) ->
    (addresses matched on IP only, (address, port) pairs)."""
    ips: set[str] = set()
    pairs: set[tuple[str, int]] = set()
    for host, port in split_list(value):
        if port.isdigit():
            pairs.add((host, int(port)))
        else:
            ips.add(host)
    return ips, pairs


class HeaderBasedTestingFilter(NamedPlugin):
    """Keeps only the endpoints named in `test-epp-endpoint-selection`; header missing: none."""

    type_name = "header-based-testing-filter"

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        value = request.headers.get(SELECTION_HEADER)
        if value is None:
            return []
        ips, pairs = parse_selection(value)
        return [e for e in endpoints if e.address in ips or (e.address, e.port) in pairs]


class DestinationEndpointServedVerifier(NamedPlugin):
    """Copies the endpoint that actually served into `x-conformance-test-served-endpoint`."""

    type_name = "destination-endpoint-served-verifier"

    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        served = response.served_endpoint or (target.hostport if target is not None else "")
        if served:
            response.set_headers[SERVED_HEADER] = served
