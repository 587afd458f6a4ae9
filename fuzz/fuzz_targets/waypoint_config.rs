//! The waypoint's config file: the YAML parse and the validation that builds its state, then
//! the CONNECT destination check for every address:port the file names. Nothing may panic,
//! and a destination the state accepts is one of the addresses it was asked about.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use waypoint::config::parse_file;
use waypoint::state::{Destination, WaypointState};
use ztunnel::config::parse_vip;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = parse_file(text) else {
        return;
    };
    let Ok(state) = WaypointState::build(&file, "cluster.local") else {
        return;
    };
    let mut asked: Vec<SocketAddr> = Vec::new();
    for svc in file.services.iter() {
        for vip in svc.vips.iter().filter_map(|v| parse_vip(v)) {
            for port in svc.ports.keys().copied().chain([0, 80]) {
                asked.push(SocketAddr::new(vip, port));
            }
        }
        let _ = state.policies_for(&svc.namespace, &svc.name).count();
    }
    for w in file.workloads.iter() {
        for ip in w.workload_ips.iter() {
            asked.push(SocketAddr::new(*ip, 8080));
        }
    }
    for addr in asked {
        match state.destination(addr) {
            Ok(Destination::Service(_, port)) | Ok(Destination::Workload(_, port)) => {
                assert_eq!(port, addr.port())
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    let _ = state.dump();
});
