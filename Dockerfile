# syntax=docker/dockerfile:1.7
# The uwsgi-it-operator image: one binary, `uwsgi-it-operator controller|agent|crds`.
#
#   docker build -t registry.example.com/uwsgi-it-operator:0.1.0 .
#
# The runtime is Debian slim, not distroless: the agent runs `nft`, `iptables-restore`,
# `iptables-save` and `conntrack` to program the servers' port forwards, so those tools (and
# their libraries) must be in the image. The controller uses none of them.
#
# Without a Docker daemon, `hack/images.sh` builds the same image (same Debian packages, same
# binary, entrypoint and user) with mmdebstrap, reproducibly; the tests and the local run use that.

# The toolchain the project is developed and tested with (newer than the MSRV in Cargo.toml,
# because dependencies may need it).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build -----------------------------------------------------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Only what the build reads: the workspace manifests, the lock file, the sources and the bench
# target the root manifest declares (cargo reads every declared target's path). The CRDs and the
# chart are not compiled in. tests/images.rs checks that these lines are enough.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY benches ./benches
# Cache mounts keep the registry and the target directory between builds; the binary is copied
# out of the cached target directory, which does not survive the RUN step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin uwsgi-it-operator \
 && install -D -m 0755 target/release/uwsgi-it-operator /out/uwsgi-it-operator

# --- runtime ---------------------------------------------------------------------------------
FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
# nftables: `nft` (the default backend); iptables: iptables-restore/-save (the second backend;
# Debian's default is the nft flavour, `update-alternatives` switches to legacy); conntrack:
# deleting the conntrack entries of changed UDP forwards; ca-certificates: TLS to the API server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates nftables iptables conntrack \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/uwsgi-it-operator /usr/local/bin/uwsgi-it-operator
# Non-root by default (the controller); the chart runs the agent as root with a few capabilities.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/uwsgi-it-operator"]
CMD ["--help"]

LABEL org.opencontainers.image.title="uwsgi-it-operator" \
      org.opencontainers.image.description="uwsgi.it hosting on Kubernetes: controller, node agent and CRDs" \
      org.opencontainers.image.licenses="Apache-2.0"
