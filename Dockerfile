# syntax=docker/dockerfile:1
#
# One image for both DaemonSets (manifests/): ambient-agent (also `install-cni`), ambient-cni (the
# plugin install-cni copies onto the node), ztunnel-init and ztunnel, in /usr/local/bin; and the
# waypoint (manifests/waypoint/).
#
# No container engine runs on the development machine; build it elsewhere, from the repository
# root, with any of:
#   docker build -t ghcr.io/example/ambient-node:latest .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/example/ambient-node:latest --push .
#   podman build -t ghcr.io/example/ambient-node:latest .
# then point manifests/kustomization.yaml (images:) at the registry you pushed to.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build ----------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# ambient-cni runs on the node itself, outside this image, next to whatever glibc the node has:
# it is linked statically (crt-static, so it needs no libc of the node's). The target triple is
# given explicitly so the flag applies to it and not to build scripts. The other binaries run in
# the runtime stage below, whose glibc matches this stage's.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    triple="$(rustc -vV | sed -n 's/^host: //p')"; \
    cargo build --release --locked -p ambient-agent -p ztunnel-init -p ztunnel -p waypoint; \
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -p ambient-cni --target "$triple"; \
    mkdir -p /out; \
    cp target/release/ambient-agent target/release/ztunnel-init target/release/ztunnel target/release/waypoint /out/; \
    cp "target/$triple/release/ambient-cni" /out/

# ---- runtime --------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
# nft: the agent and ztunnel-init run it (a runtime dependency). iproute2: `ip` for operators
# looking at a node's or the ztunnel's state (`kubectl exec ... -- ip rule`); the binaries
# themselves speak netlink directly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# install-cni's default --plugin-bin is ambient-cni next to ambient-agent: /usr/local/bin.
CMD ["ambient-agent", "--help"]
