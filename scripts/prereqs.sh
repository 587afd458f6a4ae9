#!/usr/bin/env bash
# What the lab and the tests need on a Debian machine, listed once: `./lab.sh` and `.ci/run`
# both call this (as root). It installs only what is missing.
#   scripts/prereqs.sh           the lab's packages
#   scripts/prereqs.sh --tests   also what the test suite needs (rustfmt, clippy, the manifest
#                                validator in a venv under target/)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# nft is a runtime dependency of the agent and ztunnel-init; ptp/bridge/host-local are the
# primary CNI plugins; the lab's CNI runtime is a libcni client built from golang + appc-cni;
# iperf3 (bench), conntrack/tcpdump (tests and debugging), curl (the README's examples);
# iptables + ipset: the agent's second firewall backend (--firewall iptables).
need=(nftables iproute2 containernetworking-plugins golang-go golang-github-appc-cni-dev
      iperf3 conntrack tcpdump curl iptables ipset)
if [ "${1:-}" = "--tests" ]; then
  # g++: libfuzzer-sys builds libFuzzer for the fuzz harnesses (fuzz/run.sh).
  need+=(python3-venv python3-pip g++)
fi
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup: https://rustup.rs)" >&2; exit 1; }

if [ "${1:-}" = "--tests" ]; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
  # kubernetes-validate from PyPI bundles the Kubernetes schemas (manifests/validate.sh).
  [ -x target/manifest-venv/bin/python ] || /usr/bin/python3 -m venv target/manifest-venv
  target/manifest-venv/bin/pip install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi
