# syntax=docker/dockerfile:1
# Two stages: build the virtualenv with compilers available, then copy only the
# virtualenv into a slim runtime image that runs as an unprivileged user.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The compilers only build wheels in this stage and never reach the runtime image; their versions
# follow the base image's Debian release, so they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY iam_grpc ./iam_grpc
# The client distribution the server depends on (the generated iam.v1 code lives there), installed
# from the same build context in the same pip command, so pip never looks for it on PyPI.
COPY clients/python ./clients/python
RUN python -m venv /opt/iam \
 && /opt/iam/bin/pip install --upgrade pip \
 && /opt/iam/bin/pip install -c constraints.txt ./clients/python .

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 iam \
 && useradd --system --uid 10001 --gid iam --home-dir /data --shell /usr/sbin/nologin iam \
 && mkdir -p /data && chown iam:iam /data && chmod 0750 /data
COPY --from=build /opt/iam /opt/iam
# A fixed mmap threshold: each argon2 hash's memory (19 MiB by default) goes back to the system
# when the hash ends, instead of glibc's adaptive threshold keeping it on the heap (RSS swings of
# ~20 MiB per hashing thread otherwise; tests/integration/test_malformed_payloads.py measures it).
ENV PATH=/opt/iam/bin:$PATH \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 \
    PYTHONUNBUFFERED=1 \
    IAM_DATA_DIR=/data \
    IAM_GRPC_LISTEN=0.0.0.0:50051 \
    IAM_HTTP_LISTEN=0.0.0.0:8081
# Numeric, so that Kubernetes can check runAsNonRoot against the image (the manifests run as 10001 too).
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 8081
# `iam-grpc health` reads the same settings as `serve`: the listen address (a wildcard is dialled on
# loopback) and server.tls (it then speaks TLS and trusts the configured certificate). Under mTLS
# (server.tls.client_ca_file) give it a client certificate: HEALTHCHECK CMD iam-grpc health
# --cert-file ... --key-file ..., or rely on the orchestrator's probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s CMD ["iam-grpc", "health", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["iam-grpc"]
CMD ["serve"]
