# syntax=docker/dockerfile:1
# Image of openclaw-limiter: decision API and health on 8080, replication on 8081.
# Build from the repository root (the context must hold the whole Cargo workspace):
#   docker build -f deploy/docker/limiter.Dockerfile -t openclaw-limiter:dev .
# limiter.Dockerfile.dockerignore (next to this file, read by BuildKit) keeps the context to
# the workspace sources.

# Build stage: the workspace's Rust version (Cargo.toml rust-version), release profile,
# --locked so the image builds exactly the dependencies in Cargo.lock.
ARG RUST_VERSION=1.89
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Every workspace member must be present for cargo to load the workspace, even those not built.
COPY Cargo.toml Cargo.lock ./
COPY common/ common/
COPY limiter/ limiter/
COPY metrics-adapter/ metrics-adapter/
COPY tests/ tests/
COPY loadgen/ loadgen/
COPY stack/ stack/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p openclaw-limiter --bin openclaw-limiter \
    && install -D -m 0755 target/release/openclaw-limiter /out/openclaw-limiter

# Runtime: distroless with glibc and libgcc only (no shell, no package manager), as the
# numeric non-root user 65532 that the Deployment's securityContext also sets.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/openclaw-limiter /usr/local/bin/openclaw-limiter
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/openclaw-limiter"]
