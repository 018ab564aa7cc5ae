# The endpoint picker image: the runtime only (epp/, filters/, scorers/, proto/), installed
# without extras, so it carries neither the simulator, the benchmarks nor matplotlib.
#   docker build -t epp:0.1.0 .
# The simulated model servers (`epp sim`, manifests/simulator) are a second target:
#   docker build --target sim -t epp-sim:0.1.0 .
# Dependencies and the project are installed into a virtualenv in a build stage; the
# runtime stages copy only that virtualenv and run as non-root.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/epp
WORKDIR /src
# Dependencies first, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
# xds-protos ships an older copy of `opentelemetry/proto`: reinstall opentelemetry-proto last
# so the OTLP trace exporter gets its own (as the Makefile's setup does).
RUN mkdir -p epp && touch epp/__init__.py \
 && /opt/epp/bin/pip install . \
 && /opt/epp/bin/pip install --force-reinstall --no-deps \
      "opentelemetry-proto==$(/opt/epp/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
 && /opt/epp/bin/pip uninstall -y epp
# The runtime packages; pyproject's package list also names simulator*, bench* and
# devstack*, which setuptools skips when they are absent.
COPY epp ./epp
COPY filters ./filters
COPY scorers ./scorers
COPY proto ./proto
RUN /opt/epp/bin/pip install --no-deps . \
 && /opt/epp/bin/python -m compileall -q /opt/epp/lib

FROM build AS sim-build
COPY simulator ./simulator
RUN /opt/epp/bin/pip install --no-deps --force-reinstall . \
 && /opt/epp/bin/python -m compileall -q /opt/epp/lib

FROM ${PYTHON_IMAGE} AS sim
COPY --from=sim-build /opt/epp /opt/epp
ENV PATH=/opt/epp/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["epp", "sim"]

# The default target (last stage): the picker.
FROM ${PYTHON_IMAGE}
COPY --from=build /opt/epp /opt/epp
ENV PATH=/opt/epp/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# 65532: the conventional "nonroot" uid; the manifests run with a read-only root filesystem.
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp", "serve"]
