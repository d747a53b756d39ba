# syntax=docker/dockerfile:1
# model-cache-agent image: `docker build -t model-cache-agent .`
#
# Install equivalence with CI: CI runs `python -m venv .venv && .venv/bin/pip install -e '.[dev]'`;
# this image runs `python -m venv /opt/venv && /opt/venv/bin/pip install .` from the same
# pyproject.toml on the same Python minor (3.11), so the same resolver picks the runtime
# dependencies; only the editable mode and the [dev] extra differ. Dependencies are not pinned
# by a lock file yet, so two builds on different days can resolve different versions.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Metadata first so the dependency layer is reused while only agent/ changes. README*.md is a
# glob so a missing README (pyproject names it, setuptools only warns) does not break the build.
COPY pyproject.toml README*.md ./
COPY agent ./agent
# Every runtime dependency ships manylinux wheels for 3.11 (grpcio, xxhash, hf_transfer, numpy,
# safetensors), so no compiler is needed here either; none reaches the final stage anyway.
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/model-cache-agent --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="model-cache-agent" \
      org.opencontainers.image.description="Node-level Hugging Face model cache for Kubernetes GPU clusters" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_DISABLE_TELEMETRY=1
# Only the virtualenv: no source tree, no pip cache, no build tools.
COPY --from=builder /opt/venv /opt/venv
# Non-root (the distroless "nonroot" UID). The cache hostPath is created root-owned by kubelet; the
# DaemonSet's one-shot init container (root, CAP_CHOWN only) hands it to this UID. See docs/deploy.md.
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["model-cache-agent"]
CMD ["run"]
