#!/usr/bin/env bash
# Transparent mode end to end in four network namespaces, with the SPEC's TPROXY and 0x4d3
# rules (a miniature of the lab, no node side):
#
#   client 10.231.1.2 ── zta (ztunnel node-a) ── ztb (ztunnel node-b) ── server 10.231.2.2
#                    .1.1                 .3.1  .3.2               .2.1
#
# zta TPROXYs the client's TCP to 15001; ztb TPROXYs TCP for port 15008 to 15008 and the
# outsider's TCP to 15006; each marks 0x4d3 the replies to its own spoofed sockets (in the lab
# the node's connmarks sort these out; here ztb also routes zta's passthrough traffic, so its
# rule only takes replies from the mesh server). Checks: HBONE client → server with the client's IP seen by the
# server; a 20 MB transfer intact; passthrough to a non-mesh workload; 15006 from a non-mesh
# client; a deny policy. Usage: transparent.sh <ztunnel binary>. Needs root, ip, nft, python3.
set -euo pipefail
ZT=$1
S=$$
C=ztc$S; A=zta$S; B=ztb$S; V=ztv$S; O=zto$S
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in $C $A $B $V $O; do ip netns del $n 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

for n in $C $A $B $V $O; do ip netns add $n; ip -n $n link set lo up; done
link() { # link <ns1> <dev1> <addr1> <ns2> <dev2> <addr2>
  ip link add "$2" type veth peer name "$5"
  ip link set "$2" netns "$1"; ip link set "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
  ip -n "$4" addr add "$6" dev "$5"; ip -n "$4" link set "$5" up
}
link $C c$S 10.231.1.2/24 $A ac$S 10.231.1.1/24
link $A ab$S 10.231.3.1/24 $B ba$S 10.231.3.2/24
link $B bv$S 10.231.2.1/24 $V v$S 10.231.2.2/24
link $O o$S 10.231.4.2/24 $B bo$S 10.231.4.1/24
ip -n $C route add default via 10.231.1.1
ip -n $V route add default via 10.231.2.1
ip -n $O route add default via 10.231.4.1
ip -n $A route add 10.231.2.0/24 via 10.231.3.2
ip -n $A route add 10.231.4.0/24 via 10.231.3.2
ip -n $B route add 10.231.1.0/24 via 10.231.3.1
for n in $A $B; do
  for k in all default; do ip netns exec $n sysctl -qw net.ipv4.conf.$k.rp_filter=0; done
  ip netns exec $n sysctl -qw net.ipv4.ip_forward=1
  ip -n $n rule add fwmark 0x400/0xfff lookup 100 pref 20000
  ip -n $n rule add fwmark 0x4d3/0xfff lookup 100 pref 20003
  ip -n $n route add local 0.0.0.0/0 dev lo table 100
done
for d in ac ab; do ip netns exec $A sysctl -qw net.ipv4.conf.$d$S.rp_filter=0; done
for d in ba bv bo; do ip netns exec $B sysctl -qw net.ipv4.conf.$d$S.rp_filter=0; done
ip netns exec $A nft -f - <<EOF
table ip ztunnel {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "ac$S" meta l4proto tcp tproxy to 127.0.0.1:15001 meta mark set 0x400 accept
    iifname "ab$S" ip daddr != 10.231.3.1 meta l4proto tcp meta mark set 0x4d3
  }
}
EOF
ip netns exec $B nft -f - <<EOF
table ip ztunnel {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "ba$S" tcp dport 15008 tproxy to 127.0.0.1:15008 meta mark set 0x400 accept
    iifname "bo$S" meta l4proto tcp tproxy to 127.0.0.1:15006 meta mark set 0x400 accept
    iifname "bv$S" ip saddr 10.231.2.2 ip daddr != 10.231.2.1 meta l4proto tcp meta mark set 0x4d3
  }
}
EOF

write_config() {
cat > "$WORK/local.yaml.tmp" <<EOF
workloads:
- {name: client, namespace: demo, serviceAccount: sleep, workloadIps: [10.231.1.2], protocol: HBONE, node: node-a}
- {name: server, namespace: demo, serviceAccount: server, workloadIps: [10.231.2.2], protocol: HBONE, node: node-b}
- {name: legacy, namespace: demo, workloadIps: [10.231.2.3], protocol: TCP, node: node-b}
policies: $1
EOF
mv "$WORK/local.yaml.tmp" "$WORK/local.yaml"
}
write_config "[]"
ip -n $V addr add 10.231.2.3/24 dev v$S

# The server: answers "<peer ip>\n", then echoes; port 8080 on both addresses.
cat > "$WORK/server.py" <<'EOF'
import socket, threading
def serve(c, a):
    c.sendall((a[0] + "\n").encode())
    while True:
        d = c.recv(1 << 16)
        if not d: break
        c.sendall(d)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()
EOF
cat > "$WORK/client.py" <<'EOF'
import socket, sys, hashlib
dst, n = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((dst, 8080), timeout=10)
f = c.makefile("rb")
peer = f.readline().decode().strip()
data = (bytes(range(251)) * (n // 251 + 1))[:n]
import threading
def w():
    c.sendall(data); c.shutdown(socket.SHUT_WR)
t = threading.Thread(target=w); t.start()
got = f.read()
t.join()
ok = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
print(peer, len(got), "intact" if ok else "CORRUPT")
EOF
ip netns exec $V python3 "$WORK/server.py" & pids+=($!)
ip netns exec $A "$ZT" --config "$WORK/local.yaml" --node-name node-a --ca-dir "$WORK/ca" --config-poll 100ms >"$WORK/a.log" 2>&1 & pids+=($!)
sleep 0.3 # let A create the shared CA
ip netns exec $B "$ZT" --config "$WORK/local.yaml" --node-name node-b --ca-dir "$WORK/ca" --config-poll 100ms >"$WORK/b.log" 2>&1 & pids+=($!)
for n in $A $B; do
  for i in $(seq 100); do
    ip netns exec $n python3 -c 'import urllib.request,sys; sys.exit(0 if urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready").status==200 else 1)' 2>/dev/null && break
    sleep 0.05
  done
done

fail() { echo "FAIL: $*"; echo "--- a.log"; tail -20 "$WORK/a.log"; echo "--- b.log"; tail -20 "$WORK/b.log"; exit 1; }
expect() { # expect <what> <got> <want>
  [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
  echo "ok: $1: $2"
}

out=$(ip netns exec $C python3 "$WORK/client.py" 10.231.2.2 20000000)
expect "HBONE client -> server (peer ip, bytes, integrity)" "$out" "10.231.1.2 20000000 intact"
log() { sed 's/\x1b\[[0-9;]*m//g' "$WORK/$1.log"; }
log a | grep -q 'direction="outbound".*route="hbone".*security="mutual_tls".*result="ok"' || fail "no hbone access log on A"
log b | grep -q 'direction="inbound".*src.identity=spiffe://cluster.local/ns/demo/sa/sleep.*result="ok"' || fail "no inbound access log on B"

out=$(ip netns exec $C python3 "$WORK/client.py" 10.231.2.3 1000)
expect "passthrough to a non-mesh workload" "$out" "10.231.1.2 1000 intact"

out=$(ip netns exec $O python3 "$WORK/client.py" 10.231.2.2 1000)
expect "non-mesh client -> mesh server via 15006" "$out" "10.231.4.2 1000 intact"

write_config '[{name: deny-sleep, namespace: demo, scope: Namespace, action: Deny, rules: [{principals: ["cluster.local/ns/demo/sa/sleep"]}]}]'
for i in $(seq 100); do grep -q "config reloaded" "$WORK/b.log" && break; sleep 0.05; done
out=$(ip netns exec $C python3 "$WORK/client.py" 10.231.2.2 10 2>&1 | tail -1 || true)
case "$out" in 10.231.1.2*) fail "deny policy: connection went through ($out)";; esac
log b | grep -q 'denied by policy demo/deny-sleep (401)' || fail "no 401 in B's log"
echo "ok: deny policy refuses with 401"
echo "transparent: all checks passed"
