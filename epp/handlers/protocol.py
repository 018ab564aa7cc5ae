"""ext_proc protocol names, defined once (reference protocol.md): the gRPC method, the
headers and metadata keys the picker reads and writes, and the body chunk limit."""

from __future__ import annotations

from epp.framework.types import DATA_PARALLEL_HEADER, ENCODERS_HEADER, PREFILLER_HEADER
from epp.requestcontrol.headers import DESTINATION as DESTINATION_HEADER
from epp.requestcontrol.headers import DESTINATION_SERVED as DESTINATION_SERVED_HEADER
from epp.requestcontrol.headers import STRIPPED
from epp.requestcontrol.headers import SUBSET_HINT as SUBSET_KEY

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD_PATH = f"/{SERVICE_NAME}/Process"
NOT_LEADER_MESSAGE = "not the leader endpoint picker"

# Headers the picker owns upstream: a client's copies are removed (the destination is overwritten;
# the P/D, encode and data-parallel targets reach the sidecar only from the picker), and so are the
# control headers it reads (every name, canonical and deprecated: headers.STRIPPED).
SYSTEM_HEADERS = tuple(dict.fromkeys((DESTINATION_HEADER, DESTINATION_SERVED_HEADER, PREFILLER_HEADER,
                                      ENCODERS_HEADER, DATA_PARALLEL_HEADER, *STRIPPED)))

SUBSET_NAMESPACE = "envoy.lb.subset_hint"  # filter metadata Envoy sends: the endpoints allowed
LB_NAMESPACE = "envoy.lb"  # dynamic metadata the picker returns: the destination
SCORES_KEY = "x-gateway-destination-endpoint-scores"  # in LB_NAMESPACE: {hostport: score}, --emit-endpoint-scores
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
UPSTREAM_ADDRESS = "upstream.address"  # the attribute naming the endpoint that served

MAX_CHUNK = 62_000  # streamed_response body chunks are cut at this size, as the reference picker does
DEFAULT_MAX_REQUEST_BODY_BYTES = 64 * 1024 * 1024  # --max-request-body-bytes: room for multimodal bodies

__all__ = ["SERVICE_NAME", "METHOD_PATH", "NOT_LEADER_MESSAGE", "DESTINATION_HEADER", "DESTINATION_SERVED_HEADER",
           "PREFILLER_HEADER", "SYSTEM_HEADERS", "SUBSET_NAMESPACE", "SUBSET_KEY", "LB_NAMESPACE", "SCORES_KEY",
           "EXT_PROC_ATTRIBUTES", "UPSTREAM_ADDRESS", "MAX_CHUNK", "DEFAULT_MAX_REQUEST_BODY_BYTES"]
