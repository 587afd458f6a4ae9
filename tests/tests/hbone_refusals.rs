//! What ztunnel's HBONE port (15008) refuses, driven through the lab's real path: a pod that is
//! not in the mesh dials an ambient pod's 15008, node B captures it into ztunnel B's HBONE
//! listener, and the test speaks TLS + HTTP/2 itself with certificates minted from the lab CA.
//! Needs root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambient_lab::state::LabState;
use ambient_lab::{unique_prefix, ztunnel as labzt, Lab, LabOptions};
use rustls::RootCertStore;
use ztunnel::identity::{Ca, Identity};
use ztunnel::proxy::h2::ConnectRequest;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
const HOUR: Duration = Duration::from_secs(3600);

/// Opens TLS + HTTP/2 to `addr` from the calling thread's netns with a certificate for
/// `client`, then sends one CONNECT for `authority`. Returns its HTTP status, or the error
/// that ended the attempt (a refused handshake shows up here).
fn connect(
    ca: &Ca,
    client: &Identity,
    server: &Identity,
    addr: SocketAddr,
    authority: SocketAddr,
    not_before: SystemTime,
) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cert = ca
            .mint_workload_cert(client, not_before, HOUR)
            .map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.root_der().clone()).unwrap();
        let send = ztunnel::client::connect(
            Arc::new(roots),
            cert.certified.clone(),
            vec![server.clone()],
            addr,
        )
        .await?;
        let req = ConnectRequest {
            authority,
            headers: http::HeaderMap::new(),
        };
        let opened =
            tokio::time::timeout(Duration::from_secs(3), ztunnel::client::open(&send, &req))
                .await
                .map_err(|_| "no response".to_string())?;
        let resp = match opened {
            Ok(_) => http::StatusCode::OK,
            Err(Ok(status)) => status,
            Err(Err(e)) => return Err(e),
        };
        Ok(resp.as_u16())
    })
}

#[test]
fn hbone_port_refuses_what_it_must() {
    let lab = Lab::up(&unique_prefix("ref"), LabOptions::new(LAB)).expect("lab up");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let (ca, _) =
        Ca::load_or_create(&state.run_dir.join(labzt::CA_DIR), labzt::TRUST_DOMAIN).unwrap();
    let app: Ipv4Addr = lab.pod_ip("b-app");
    let hbone = SocketAddr::new(app.into(), 15008);
    let target = SocketAddr::new(app.into(), 9080);
    let client = Identity::new(labzt::TRUST_DOMAIN, "demo", "client");
    let server = Identity::new(labzt::TRUST_DOMAIN, "demo", "app");
    let now = SystemTime::now() - Duration::from_secs(60);
    let ca = &ca;
    let try_from_plain = |client: Identity, authority: SocketAddr, not_before: SystemTime| {
        let server = server.clone();
        lab.run_in("a-plain", move || {
            connect(ca, &client, &server, hbone, authority, not_before)
        })
        .unwrap()
    };

    // Control: a valid mesh certificate and a local workload as authority → 200.
    assert_eq!(try_from_plain(client.clone(), target, now), Ok(200));

    // A CONNECT to an address that is not a workload on node B → 400 (never an open proxy).
    let elsewhere = SocketAddr::new(lab.pod_ip("a-app").into(), 9080);
    assert_eq!(try_from_plain(client.clone(), elsewhere, now), Ok(400));

    // A client certificate from another trust domain → refused.
    let foreign = Identity::new("evil.example", "demo", "client");
    let r = try_from_plain(foreign, target, now);
    assert!(r.is_err(), "foreign trust domain admitted: {r:?}");

    // An expired client certificate → refused.
    let r = try_from_plain(client.clone(), target, SystemTime::now() - 3 * HOUR);
    assert!(r.is_err(), "expired certificate admitted: {r:?}");

    // Plaintext to 15008 → no HTTP answer, the connection is closed.
    let reply = lab
        .run_in("a-plain", move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&hbone, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"CONNECT 10.244.2.3:9080 HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            Ok(buf)
        })
        .unwrap()
        .unwrap();
    assert!(
        !reply.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {reply:?}"
    );
    assert!(
        !String::from_utf8_lossy(&reply).contains("server="),
        "plaintext reached the pod"
    );
}
