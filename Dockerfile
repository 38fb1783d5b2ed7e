# syntax=docker/dockerfile:1
# The lightbox binary: one image for every component (`lightbox serve --target ...`), used by
# docker-compose.yml and deploy/k8s. Checked offline by .ci/deploy-check (hadolint).
#   docker build -t lightbox:dev .
#
# The git revision in `--version` reads "unknown revision" here: .git stays out of the
# build context (.dockerignore) so that a commit does not invalidate the build cache.

# Build stage: the toolchain the project pins (rust-version 1.94+; CI uses 1.95). ring and the
# bundled SQLite need only the C compiler this image already has.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts (BuildKit) keep the crates.io registry and target/ between builds; the binary is
# copied out of the cached target/ in the same step, as the cache is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin lightbox \
    && install -D -m 0755 target/release/lightbox /out/lightbox

# Runtime stage: glibc, libgcc, CA certificates and tzdata, no shell or package manager (the
# same Debian 12 as the build stage, so the glibc the binary was linked against). Nothing in the
# deployment needs a shell: health checks run `lightbox health`, Kubernetes' preStop is its
# native `sleep` action, and the drain is the process's own LIGHTBOX_DRAIN_DELAY.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lightbox /usr/local/bin/lightbox
# distroless's "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /home/nonroot
# Inside a container every listener binds all interfaces; the container is the boundary.
# The admin listener serves gRPC health and GET /metrics (fault injection stays off unless
# LIGHTBOX_FAULTS=true with LIGHTBOX_ADMIN_TOKEN).
ENV LIGHTBOX_ADMIN_ADDR=0.0.0.0:50050 \
    LIGHTBOX_USERS_ADDR=0.0.0.0:50051 \
    LIGHTBOX_CONTRACTS_ADDR=0.0.0.0:50052 \
    LIGHTBOX_PHOTOS_ADDR=0.0.0.0:50053 \
    LIGHTBOX_GATEWAY_ADDR=0.0.0.0:8080
# admin (health, metrics), users, contracts, photos (gRPC), gateway (HTTP/JSON)
EXPOSE 50050 50051 50052 50053 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/lightbox", "health", "--addr", "127.0.0.1:50050"]
ENTRYPOINT ["/usr/local/bin/lightbox"]
# Which component to run is the deployment's choice (docker-compose.yml, deploy/k8s give
# `serve --target NAME`); on its own, the image says how to use it.
CMD ["--help"]
