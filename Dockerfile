# Multi-stage build: compile in the Rust image, run in a slim non-root image.
#
#   docker build -t switchyard .          (or: podman build -t switchyard .)
#
# Where no image registry can be reached, deploy/container-check.sh builds the runtime image
# from a Debian base made locally and a binary built on the host (`--build-arg BINARY=prebuilt`,
# with the binary as `switchyard-prebuilt` in the build context), runs it and checks /healthz.
ARG BINARY=build

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin switchyard

# A binary built outside the image (a glibc build for Debian bookworm).
FROM scratch AS prebuilt
COPY switchyard-prebuilt /src/target/release/switchyard

FROM ${BINARY} AS binary

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /etc/switchyard switchyard \
    && mkdir -p /var/lib/switchyard && chown switchyard /var/lib/switchyard
COPY --from=binary /src/target/release/switchyard /usr/local/bin/switchyard
COPY routes.yaml /etc/switchyard/routes.yaml
COPY plugins /etc/switchyard/plugins
# routes.yaml compiles the example service's proto at load time.
COPY examples/protos /etc/switchyard/examples/protos
WORKDIR /etc/switchyard
USER switchyard
# The admin listener (health, readiness, metrics, config, reload) binds 127.0.0.1:9901 by
# default, which the health check below reaches from inside the container. To scrape /metrics
# from outside, set SWITCHYARD_ADMIN=0.0.0.0:9901 (the example routes.yaml reads it), set
# server.admin_token from an env var, and publish 9901 only on a network you trust.
# The state store and the spool (fsynced; keep it on a volume so that spooled messages
# survive the container).
ENV SWITCHYARD_CONFIG=/etc/switchyard/routes.yaml \
    SWITCHYARD_STATE=/var/lib/switchyard/state.redb \
    SWITCHYARD_LOG_FORMAT=json
VOLUME /var/lib/switchyard
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
CMD ["run"]
