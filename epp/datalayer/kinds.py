"""Payload kinds a data-layer source yields (`output_kind`) and an extractor reads
(`input_kind`); the runtime pairs them (the reference checks the same pairing by the
extractor's Go input type)."""

PROMETHEUS_TEXT = "prometheus-text"  # a model server's /metrics page
OPENAI_MODELS = "openai-models"  # an OpenAI /v1/models answer
ENDPOINT_EVENTS = "endpoint-events"  # endpoint added/updated/deleted
K8S_NOTIFICATIONS = "k8s-notifications"  # add/update/delete of one Kubernetes kind

# The events of ENDPOINT_EVENTS and K8S_NOTIFICATIONS an extractor is told: added or updated, deleted.
UPSERT, DELETE = "upsert", "delete"
