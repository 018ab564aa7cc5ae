"""The names of the request headers the picker and its plugins read or write, defined once
(the reference's pkg/epp/metadata/consts.go). A contract like the data keys: the core
(epp.requestcontrol.headers: aliases, parsing, what is stripped) and the plugins that read
a header (slo-deadline-ordering-policy, session affinity) import the same name from here."""

from __future__ import annotations

OBJECTIVE = "x-llm-d-inference-objective"
FAIRNESS_ID = "x-llm-d-inference-fairness-id"
MODEL_NAME_REWRITE = "x-llm-d-model-name-rewrite"
SLO_TTFT_MS = "x-llm-d-slo-ttft-ms"
SLO_TPOT_MS = "x-llm-d-slo-tpot-ms"
VIDEO_FPS = "x-llm-d-video-fps"
VIDEO_DURATION_SECONDS = "x-llm-d-video-duration-seconds"
VIDEO_RESOLUTION = "x-llm-d-video-resolution"
SUBSET_HINT = "x-gateway-destination-endpoint-subset"
DESTINATION = "x-gateway-destination-endpoint"
DESTINATION_SERVED = "x-gateway-destination-endpoint-served"
REQUEST_ID = "x-request-id"
SESSION_ID = "x-session-id"  # read by the session_id affinity strategy (a plugin), not by the core
