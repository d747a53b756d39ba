# syntax=docker/dockerfile:1
# model-cache-agent image: `docker build --build-arg VERSION=0.1.0 -t model-cache-agent:0.1.0 .`
# Releases are built by .github/workflows/release.yml for linux/amd64 and linux/arm64 with VERSION set
# from the git tag. Without VERSION the package reports the fallback 0.0.0 (the build context has no .git).
#
# Install equivalence with CI (tests/test_release.py parses both and compares): .ci/run runs
#   python3 -m venv .venv && .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[dev]'
# and this image runs the same three commands into /opt/venv, only without -e and the [dev] extra, from the
# same pyproject.toml on the same Python minor (3.11), so the same resolver picks the runtime dependencies.
# Dependencies are not pinned by a lock file yet, so two builds on different days can resolve different versions.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The context is only what .dockerignore lets through. README*.md is a glob so a missing README
# (pyproject names it, setuptools only warns) does not break the build; LICENSE goes into the wheel.
COPY pyproject.toml README*.md LICENSE ./
COPY agent ./agent
# Every runtime dependency ships manylinux wheels for 3.11 (grpcio, xxhash, hf_transfer, numpy,
# safetensors), so no compiler is needed here either; none reaches the final stage anyway.
# VERSION (PEP 440, e.g. 0.1.0) becomes the package version; the build fails if the installed agent reports another.
ARG VERSION=""
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MODEL_CACHE_AGENT="$VERSION" /opt/venv/bin/pip install . \
 && /opt/venv/bin/model-cache-agent --version \
 && { [ -z "$VERSION" ] || [ "$(/opt/venv/bin/model-cache-agent --version)" = "$VERSION" ]; }

FROM ${PYTHON_IMAGE}
ARG VERSION=""
LABEL org.opencontainers.image.title="model-cache-agent" \
      org.opencontainers.image.version="${VERSION}" \
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
