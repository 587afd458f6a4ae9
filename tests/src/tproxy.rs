//! `ambient-lab tproxy-listen`: a stand-in for ztunnel's transparent listeners. Each port
//! gets an IP_TRANSPARENT listener on 0.0.0.0 (TPROXY only hands packets to such
//! sockets) and, when the netns has IPv6 (the lab's ipv6 and dual pods), an
//! IPV6_TRANSPARENT one on `[::]` (v6 only, beside the v4 one); every accepted connection is answered with one line naming the listener
//! port, the original destination (the accepted socket's local address) and the peer,
//! logged as a JSON line; then whatever the client sends is echoed until it closes.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6,
};
use serde::{Deserialize, Serialize};

/// One accepted connection, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TproxyRecord {
    pub port: u16,
    pub orig_dst: SocketAddr,
    pub peer: SocketAddr,
}

impl TproxyRecord {
    /// The line sent to the client.
    pub fn line(&self) -> String {
        format!(
            "tproxy port={} orig_dst={} peer={}\n",
            self.port, self.orig_dst, self.peer
        )
    }

    /// Parses [`TproxyRecord::line`] back.
    pub fn parse_line(line: &str) -> Option<Self> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "tproxy" {
            return None;
        }
        let mut port = None;
        let mut orig_dst = None;
        let mut peer = None;
        for f in fields {
            if let Some(v) = f.strip_prefix("port=") {
                port = v.parse().ok();
            } else if let Some(v) = f.strip_prefix("orig_dst=") {
                orig_dst = v.parse().ok();
            } else if let Some(v) = f.strip_prefix("peer=") {
                peer = v.parse().ok();
            }
        }
        Some(Self {
            port: port?,
            orig_dst: orig_dst?,
            peer: peer?,
        })
    }
}

/// Reads every record of a tproxy log.
pub fn read_log(path: &Path) -> Result<Vec<TproxyRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad tproxy log line {l:?}")))
        .collect()
}

/// A listener on 0.0.0.0:`port` with IP_TRANSPARENT set before bind.
pub fn transparent_listener(port: u16) -> Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::IpTransparent, &true).context("IP_TRANSPARENT")?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))
        .with_context(|| format!("bind 0.0.0.0:{port}"))?;
    listen(&fd, Backlog::new(512).context("backlog")?).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// A listener on `[::]:port`, IPv6 only, with IPV6_TRANSPARENT set before bind (nix has no
/// wrapper for it).
pub fn transparent_listener6(port: u16) -> Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TRANSPARENT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IPV6_TRANSPARENT");
    }
    let any = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(any)).with_context(|| format!("bind [::]:{port}"))?;
    listen(&fd, Backlog::new(512).context("backlog")?).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// Whether this thread's netns has IPv6 (`/proc/sys/net` shows the caller's netns).
fn netns_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

pub fn run(ports: &[u16], log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let log = Arc::new(Mutex::new(file));
    let mut listeners = ports
        .iter()
        .map(|&p| transparent_listener(p).map(|l| (p, l)))
        .collect::<Result<Vec<_>>>()?;
    let v6 = netns_has_ipv6();
    if v6 {
        for &p in ports {
            listeners.push((p, transparent_listener6(p)?));
        }
    }
    // The harness waits for this line.
    eprintln!(
        "tproxy-listen: IP_TRANSPARENT listeners on 0.0.0.0{} ports {ports:?}",
        if v6 { " and [::]" } else { "" }
    );
    std::thread::scope(|s| {
        for (port, listener) in listeners {
            let log = Arc::clone(&log);
            s.spawn(move || accept_loop(port, listener, &log));
        }
    });
    Ok(())
}

fn accept_loop(port: u16, listener: TcpListener, log: &Mutex<File>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(port, stream, log) {
                    eprintln!("tproxy-listen: port {port}: {e:#}");
                }
            }
            Err(e) => eprintln!("tproxy-listen: accept on {port}: {e}"),
        }
    }
}

fn answer(port: u16, mut stream: TcpStream, log: &Mutex<File>) -> Result<()> {
    let rec = TproxyRecord {
        port,
        orig_dst: stream.local_addr()?,
        peer: stream.peer_addr()?,
    };
    {
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = serde_json::to_string(&rec)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
    }
    stream.write_all(rec.line().as_bytes())?;
    // Then echo until the client closes, so long-lived captured connections can be tested.
    std::thread::spawn(move || {
        if let Ok(mut reader) = stream.try_clone() {
            let _ = std::io::copy(&mut reader, &mut stream);
        }
        stream.shutdown(std::net::Shutdown::Both).ok();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trip() {
        let r = TproxyRecord {
            port: 15001,
            orig_dst: "10.244.2.3:9080".parse().unwrap(),
            peer: "10.244.1.4:5555".parse().unwrap(),
        };
        assert_eq!(
            r.line(),
            "tproxy port=15001 orig_dst=10.244.2.3:9080 peer=10.244.1.4:5555\n"
        );
        assert_eq!(TproxyRecord::parse_line(&r.line()), Some(r.clone()));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"origDst\":\"10.244.2.3:9080\""));
        let v6 = TproxyRecord {
            port: 15006,
            orig_dst: "[fd00:10:244:2::3]:9080".parse().unwrap(),
            peer: "[fd00:10:244:1::4]:5555".parse().unwrap(),
        };
        assert_eq!(TproxyRecord::parse_line(&v6.line()), Some(v6.clone()));
    }
}
