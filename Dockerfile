# syntax=docker/dockerfile:1
# The archiver's image: both binaries (planner, worker) and supercronic (the
# compose stack's scheduler runs the README's crontab with it).
#
#   docker build -t archiver .
#   docker run --rm archiver planner --help
#   docker run --rm -e DATABASE_URL=... -e QUEUE_URL=... archiver worker
#
# Linted by hadolint in the test suite (tests/it/deploy.rs).

# The Rust release Cargo.toml's rust-version names: the oldest the code
# promises to build with, so the image proves that promise too.
ARG RUST_VERSION=1.94
ARG DEBIAN_RELEASE=bookworm

# ------------------------------------------------------------------ build
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Only what the two binaries are built from (.dockerignore keeps the rest
# out of the context): a change to tests or docs does not rebuild.
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations ./migrations
COPY src ./src
# A workspace member: cargo loads every member's manifest, even to build
# only the two binaries.
COPY bench ./bench
# Cache mounts keep the registry and target/ between builds; the binaries
# are copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin planner --bin worker \
    && install -D -m 0755 target/release/planner target/release/worker -t /out/

# ------------------------------------------------------------ supercronic
# cron for containers: runs as any user, passes the environment on to its
# jobs, logs to stdout and stops on SIGTERM. A release binary checked
# against its published SHA-1; only amd64's is pinned here, other
# architectures pass theirs as build arguments.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS supercronic
ARG TARGETARCH=amd64
ARG SUPERCRONIC_VERSION=v0.2.34
ARG SUPERCRONIC_SHA1SUM_amd64=e8631edc1775000d119b70fd40339a7238eece14
ARG SUPERCRONIC_SHA1SUM_arm64=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN sum_var="SUPERCRONIC_SHA1SUM_${TARGETARCH}" \
    && sum="${!sum_var:?no SHA-1 for supercronic-linux-${TARGETARCH}: pass --build-arg ${sum_var}=...}" \
    && curl -fsSL -o /supercronic \
       "https://github.com/aptible/supercronic/releases/download/${SUPERCRONIC_VERSION}/supercronic-linux-${TARGETARCH}" \
    && echo "${sum}  /supercronic" | sha1sum -c - \
    && chmod 0755 /supercronic

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="archiver" \
      org.opencontainers.image.description="Data-lifecycle fleet for PostgreSQL: archives old rows in keyset batches through a ledger, over RabbitMQ, SQS or inline." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:${DEBIAN_RELEASE}-slim"
# CA certificates for TLS to the database, broker and object store; tini as
# PID 1 reaps what supercronic's jobs leave and forwards signals. Versions
# are Debian's stable ones (security updates come with a rebuild).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini tzdata \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so volumes (REPORTS_ROOT) can be given to it on the host.
RUN groupadd --system --gid 10001 archiver \
    && useradd --system --uid 10001 --gid archiver --home-dir /var/lib/archiver \
       --create-home --shell /usr/sbin/nologin archiver \
    && install -d -o archiver -g archiver /srv/reports /var/lib/archiver/reports-archive
COPY --from=build /out/planner /out/worker /usr/local/bin/
COPY --from=supercronic /supercronic /usr/local/bin/supercronic
USER 10001:10001
WORKDIR /var/lib/archiver
# Logs as JSON lines for log shippers; override with ARCHIVER_LOG_FORMAT=text.
ENV ARCHIVER_LOG_FORMAT=json \
    TZ=UTC
# The worker's endpoint (/healthz, /readyz, /metrics) and the exporter's.
EXPOSE 9188 9187
# `docker run IMAGE worker`, `docker run IMAGE planner --all`, or any
# command of the image (supercronic, a shell to look around).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["worker"]
