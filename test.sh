#!/usr/bin/env bash
# Runs every test: unit tests and the root integration tests on the netns lab.
# Needs root (network namespaces, netlink, nftables) and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh must run as root (it builds network namespaces)" >&2; exit 1; }
manifests/validate.sh
cargo build --workspace --bins
fuzz/run.sh 5  # every fuzz harness for 5 s, in its own build (fuzz/run.sh 600: a long run)
# Bounded: a test that hangs fails the run (named in the output above) well inside CI's budget
# instead of eating it. The whole suite takes under 10 minutes on 2 cores.
rc=0
timeout -k 30 2400 cargo test --workspace -- --test-threads=2 || rc=$?
if [ "$rc" = 124 ]; then echo "test.sh: cargo test did not finish in 40 minutes (a hung test: see 'has been running for over 60 seconds' above)" >&2; fi
[ "$rc" = 0 ] || exit "$rc"
# The second firewall backend: the lab suites of the node path again on iptables + ipset
# (capture matrix, CNI enroll/remove, agent SIGKILL restart, cleanup, kube-proxy coexistence
# against iptables-mode Services, the state-directory recovery, the real data plane through
# ztunnel-init's iptables TPROXY rules).
AMBIENT_LAB_FIREWALL=iptables timeout -k 30 900 \
  cargo test -p ambient-lab --test redirection --test agent_state_recovery --test hbone \
  -- --test-threads=2
# Nothing may be left behind.
left=$(ls /run/netns 2>/dev/null | grep -E '^(amb|t[0-9a-z]+|nfttest)' || true)
if [ -n "$left" ]; then echo "leftover network namespaces: $left" >&2; exit 1; fi
