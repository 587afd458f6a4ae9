//! The HBONE server's CONNECT admission (ztunnel's 15008, `proxy::inbound::admit`): a
//! request's method, authority and headers against a fixed node state, from one of a few
//! tunnel peers. Nothing may panic, and whatever is admitted keeps the promises: a CONNECT,
//! to a workload of this node at exactly the authority, served under the tunnel's identity,
//! from the peer's address or a workload of the peer's own identity.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ztunnel::config::parse_local_config;
use ztunnel::identity::Identity;
use ztunnel::proxy::forwarded_for;
use ztunnel::proxy::inbound::{admit, Tunnel};
use ztunnel::state::State;

const NODE: &str = r#"
workloads:
- {name: client, namespace: demo, serviceAccount: sleep, workloadIps: [10.0.0.1], protocol: HBONE, node: node-a}
- {name: client-2, namespace: demo, serviceAccount: sleep, workloadIps: [10.0.2.1], protocol: HBONE, node: node-b}
- {name: echo, namespace: demo, serviceAccount: echo, workloadIps: [10.0.0.2, "fd00::2"], protocol: HBONE, node: node-a, authorizationPolicies: [demo/only-sleep]}
- {name: reviews, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.0.3], protocol: HBONE, node: node-a, waypoint: {address: 10.0.0.9}}
- {name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.0.9], protocol: HBONE, node: node-b}
- {name: remote, namespace: demo, serviceAccount: echo, workloadIps: [10.0.1.1], protocol: HBONE, node: node-b}
policies:
- {name: only-sleep, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [{serviceAccounts: [demo/sleep]}]}
"#;

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let cfg = parse_local_config(NODE).expect("the fixed node config parses");
        State::build(&cfg, "cluster.local", "node-a").expect("the fixed node config is valid")
    })
}

fn tunnel(pick: u8) -> Tunnel {
    let id = |sa: &str| Identity::new("cluster.local", "demo", sa);
    let (peer, peer_sa, served_sa) = match pick % 4 {
        0 => ("10.0.2.1:40000", "sleep", "echo"),
        1 => ("10.0.0.9:40001", "waypoint", "reviews"),
        2 => ("10.0.1.1:40002", "echo", "echo"),
        _ => ("192.0.2.7:40003", "stranger", "sleep"),
    };
    Tunnel {
        peer: peer.parse().expect("a fixed address"),
        peer_identity: id(peer_sa),
        served: id(served_sa),
    }
}

// Input: one byte picking the tunnel, then `METHOD\nURI\nname: value\n...` (lossy UTF-8).
fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let mut req = http::Request::builder()
        .method(lines.next().unwrap_or_default())
        .uri(lines.next().unwrap_or_default());
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let _ = forwarded_for(value);
        req = req.header(name.trim(), value.trim());
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    let st = state();
    let tunnel = tunnel(pick);
    if let Ok((wl, target, src)) = admit(st, &tunnel, &req) {
        assert_eq!(req.method(), http::Method::CONNECT);
        let authority: SocketAddr = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .expect("admitted with an <ip>:<port> authority");
        assert_eq!(target, authority);
        let local = st
            .local_workload_by_ip(target.ip())
            .expect("admitted to a workload of this node");
        assert_eq!(local.uid, wl.uid);
        assert_eq!(wl.identity, tunnel.served);
        let from_peer_identity = st
            .workload_by_ip(src.ip())
            .is_some_and(|w| w.identity == tunnel.peer_identity);
        assert!(
            src == tunnel.peer || from_peer_identity,
            "spoofed source {src}"
        );
    }
});
