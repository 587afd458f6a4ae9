#!/usr/bin/env bash
# Runs every test: unit tests and the root integration tests on the netns lab.
# Needs root (network namespaces, netlink, nftables) and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh must run as root (it builds network namespaces)" >&2; exit 1; }
manifests/validate.sh
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
# Nothing may be left behind.
left=$(ls /run/netns 2>/dev/null | grep -E '^(amb|t[0-9a-z]+|nfttest)' || true)
if [ -n "$left" ]; then echo "leftover network namespaces: $left" >&2; exit 1; fi
