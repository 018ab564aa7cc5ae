# The endpoint picker image (also runs the simulator: `epp sim`).
#   docker build -t epp:0.1.0 .
# Two stages: dependencies and the project are installed into a virtualenv in the
# build stage; the runtime stage copies only that virtualenv and runs as non-root.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/epp
WORKDIR /src
# Dependencies first, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p epp && touch epp/__init__.py \
 && /opt/epp/bin/pip install . \
 && /opt/epp/bin/pip uninstall -y epp
COPY epp ./epp
COPY filters ./filters
COPY scorers ./scorers
COPY simulator ./simulator
COPY bench ./bench
COPY proto ./proto
RUN /opt/epp/bin/pip install --no-deps . \
 && /opt/epp/bin/python -m compileall -q /opt/epp/lib

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/epp /opt/epp
ENV PATH=/opt/epp/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# 65532: the conventional "nonroot" uid; the manifests run with a read-only root filesystem.
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp", "serve"]
