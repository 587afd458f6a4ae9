#!/usr/bin/env bash
# From a fresh Debian machine (as root) to traffic: installs what the lab needs, builds, brings
# the lab up and shows captured connections and HTTP through the waypoint.
#   ./lab.sh            (again later: rebuilds what changed and brings a fresh lab up)
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "lab.sh must run as root (the lab builds network namespaces)" >&2; exit 1; }
scripts/prereqs.sh
cargo build --workspace --bins
lab=target/debug/ambient-lab
"$lab" down >/dev/null 2>&1 || true
"$lab" up
"$lab" demo
cat <<'MSG'

The lab is up. Go on with:
  target/debug/ambient-lab status [--json]         the topology, the waypoint and its Services
  target/debug/ambient-lab exec a-client -- curl -s -H 'x-version: v2' http://10.96.0.20/
                                                   HTTP through the waypoint (v2 by header)
  ip netns exec amb-a-ztunnel curl -s '127.0.0.1:15000/debug/route?src=10.244.1.4&dst=10.96.0.10:80'
                                                   ztunnel A's decision for one connection
  target/debug/ambient-lab down                    removes every netns, process and file it made
MSG
