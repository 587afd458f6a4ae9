//! ztunnel's config file: the YAML parse and the validation that builds its state (the same
//! two steps as a start or a reload). Nothing may panic, and a built state must answer the
//! lookups the proxies make for every address it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::config::{parse_local_config, parse_vip};
use ztunnel::state::State;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = parse_local_config(text) else {
        return;
    };
    let Ok(state) = State::build(&cfg, "cluster.local", "node-a") else {
        return;
    };
    for w in cfg.workloads.iter() {
        for ip in w.workload_ips.iter() {
            if let Some(wl) = state.workload_by_ip(*ip) {
                let _ = state.is_waypoint(*ip);
                let _ = state.policies_for(wl).count();
                for port in [80, 15008] {
                    let _ = state.required_waypoints(wl, port);
                }
            }
        }
    }
    for svc in cfg.services.iter() {
        if let Some(s) = state.service_by_key(&format!("{}/{}", svc.namespace, svc.hostname)) {
            let _ = state.endpoints(s).len();
        }
        for vip in svc.vips.iter().filter_map(|v| parse_vip(v)) {
            if let Some(s) = state.service_by_vip(vip) {
                for (port, _) in s.ports.iter() {
                    let _ = state.is_known(std::net::SocketAddr::new(vip, *port));
                }
            }
        }
    }
    let _ = state.local_identities();
});
