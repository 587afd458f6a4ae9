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
# client; a deny policy. With family 6 the same in IPv6 (fd00:231:<n>::/64, `table ip6`,
# TPROXY to [::1], IPV6_TRANSPARENT sockets; ztunnel on its default listeners, which include
# `[::]`). Usage: transparent.sh <ztunnel binary> [4|6]. Needs root, ip, nft, python3.
set -euo pipefail
ZT=$1
F=${2:-4}
S=$$
# The two families' spellings: net <n> <host> is an address, LEN the prefix length.
if [ "$F" = 6 ]; then
  net() { echo "fd00:231:$1::$2"; }
  LEN=64; NFT=ip6; LOOP="[::1]"; ANY="::/0"; NODAD=nodad; PYFAM=AF_INET6; PYANY="::"
else
  net() { echo "10.231.$1.$2"; }
  LEN=24; NFT=ip; LOOP=127.0.0.1; ANY=0.0.0.0/0; NODAD=; PYFAM=AF_INET; PYANY=0.0.0.0
fi
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
  ip -n "$1" addr add "$3" dev "$2" $NODAD; ip -n "$1" link set "$2" up
  ip -n "$4" addr add "$6" dev "$5" $NODAD; ip -n "$4" link set "$5" up
}
link $C c$S $(net 1 2)/$LEN $A ac$S $(net 1 1)/$LEN
link $A ab$S $(net 3 1)/$LEN $B ba$S $(net 3 2)/$LEN
link $B bv$S $(net 2 1)/$LEN $V v$S $(net 2 2)/$LEN
link $O o$S $(net 4 2)/$LEN $B bo$S $(net 4 1)/$LEN
ip -$F -n $C route add default via $(net 1 1)
ip -$F -n $V route add default via $(net 2 1)
ip -$F -n $O route add default via $(net 4 1)
ip -$F -n $A route add $(net 2 0)/$LEN via $(net 3 2)
ip -$F -n $A route add $(net 4 0)/$LEN via $(net 3 2)
ip -$F -n $B route add $(net 1 0)/$LEN via $(net 3 1)
for n in $A $B; do
  if [ "$F" = 6 ]; then
    # IPv6 has no rp_filter to switch off.
    ip netns exec $n sysctl -qw net.ipv6.conf.all.forwarding=1
  else
    for k in all default; do ip netns exec $n sysctl -qw net.ipv4.conf.$k.rp_filter=0; done
    ip netns exec $n sysctl -qw net.ipv4.ip_forward=1
  fi
  ip -$F -n $n rule add fwmark 0x400/0xfff lookup 100 pref 20000
  ip -$F -n $n rule add fwmark 0x4d3/0xfff lookup 100 pref 20003
  ip -$F -n $n route add local $ANY dev lo table 100
done
if [ "$F" = 4 ]; then
  for d in ac ab; do ip netns exec $A sysctl -qw net.ipv4.conf.$d$S.rp_filter=0; done
  for d in ba bv bo; do ip netns exec $B sysctl -qw net.ipv4.conf.$d$S.rp_filter=0; done
fi
ip netns exec $A nft -f - <<EOF
table $NFT ztunnel {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "ac$S" meta l4proto tcp tproxy to $LOOP:15001 meta mark set 0x400 accept
    iifname "ab$S" $NFT daddr != $(net 3 1) meta l4proto tcp meta mark set 0x4d3
  }
}
EOF
ip netns exec $B nft -f - <<EOF
table $NFT ztunnel {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "ba$S" tcp dport 15008 tproxy to $LOOP:15008 meta mark set 0x400 accept
    iifname "bo$S" meta l4proto tcp tproxy to $LOOP:15006 meta mark set 0x400 accept
    iifname "bv$S" $NFT saddr $(net 2 2) $NFT daddr != $(net 2 1) meta l4proto tcp meta mark set 0x4d3
  }
}
EOF

write_config() {
cat > "$WORK/local.yaml.tmp" <<EOF
workloads:
- {name: client, namespace: demo, serviceAccount: sleep, workloadIps: ["$(net 1 2)"], protocol: HBONE, node: node-a}
- {name: server, namespace: demo, serviceAccount: server, workloadIps: ["$(net 2 2)"], protocol: HBONE, node: node-b}
- {name: legacy, namespace: demo, workloadIps: ["$(net 2 3)"], protocol: TCP, node: node-b}
policies: $1
EOF
mv "$WORK/local.yaml.tmp" "$WORK/local.yaml"
}
write_config "[]"
ip -n $V addr add $(net 2 3)/$LEN dev v$S $NODAD

# The server: answers "<peer ip>\n", then echoes; port 8080 on both addresses.
cat > "$WORK/server.py" <<EOF
import socket, threading
def serve(c, a):
    c.sendall((a[0] + "\n").encode())
    while True:
        d = c.recv(1 << 16)
        if not d: break
        c.sendall(d)
    c.close()
s = socket.socket(socket.$PYFAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("$PYANY", 8080)); s.listen(64)
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

out=$(ip netns exec $C python3 "$WORK/client.py" $(net 2 2) 20000000)
expect "HBONE client -> server (peer ip, bytes, integrity)" "$out" "$(net 1 2) 20000000 intact"
log() { sed 's/\x1b\[[0-9;]*m//g' "$WORK/$1.log"; }
log a | grep -q 'direction="outbound".*route="hbone".*security="mutual_tls".*result="ok"' || fail "no hbone access log on A"
log b | grep -q 'direction="inbound".*src.identity=spiffe://cluster.local/ns/demo/sa/sleep.*result="ok"' || fail "no inbound access log on B"

out=$(ip netns exec $C python3 "$WORK/client.py" $(net 2 3) 1000)
expect "passthrough to a non-mesh workload" "$out" "$(net 1 2) 1000 intact"

out=$(ip netns exec $O python3 "$WORK/client.py" $(net 2 2) 1000)
expect "non-mesh client -> mesh server via 15006" "$out" "$(net 4 2) 1000 intact"

write_config '[{name: deny-sleep, namespace: demo, scope: Namespace, action: Deny, rules: [{principals: ["cluster.local/ns/demo/sa/sleep"]}]}]'
for i in $(seq 100); do grep -q "config reloaded" "$WORK/b.log" && break; sleep 0.05; done
out=$(ip netns exec $C python3 "$WORK/client.py" $(net 2 2) 10 2>&1 | tail -1 || true)
case "$out" in "$(net 1 2)"*) fail "deny policy: connection went through ($out)";; esac
log b | grep -q 'denied by policy demo/deny-sleep (401)' || fail "no 401 in B's log"
echo "ok: deny policy refuses with 401"
echo "transparent (IPv$F): all checks passed"
