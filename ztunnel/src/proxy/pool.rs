//! The HBONE connection pool.
//!
//! Connections are keyed by (source identity, destination identities, destination address,
//! source IP): a stream only ever shares a connection with streams that would have made the
//! same TLS handshake from the same address. Choosing a connection for a new stream:
//!
//! 1. an idle one if there is one;
//! 2. otherwise a new one while the key has fewer than `spread` connections (so concurrent
//!    streams land on different connections, whose TLS and framing work runs on different
//!    cores);
//! 3. otherwise the least loaded one below `max_streams` streams;
//! 4. otherwise a new one (or wait for one being opened).
//!
//! Connections idle for `idle_timeout` are dropped, which closes them (GOAWAY).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use super::h2::{client_builder, ConnectRequest, Early, EarlyError, H2Stream};
use super::Error;
use crate::identity::Identity;
use crate::socket;
use crate::tls::TlsContext;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolKey {
    pub src_identity: Identity,
    pub dst_identities: Vec<Identity>,
    pub dst: SocketAddr,
    pub src_ip: Option<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub spread: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub transparent: bool,
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    total: AtomicU64,
    created: Instant,
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    pending: usize,
}

/// Holds a stream's slot on its connection; dropping it frees the slot.
pub struct StreamGuard {
    conn: Arc<Conn>,
}

impl StreamGuard {
    pub fn connection_id(&self) -> u64 {
        self.conn.id
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().unwrap() = Instant::now();
        }
    }
}

enum Pick {
    Use(Arc<Conn>),
    Open,
    Wait,
}

/// Where a new stream goes, given the active streams of a key's connections.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The connection at this index.
    Use(usize),
    /// A new connection.
    Open,
    /// Wait for a connection being opened.
    Wait,
}

/// The pool's choice (see the module docs): an idle connection; else a new one while fewer
/// than `spread` exist or are being opened; else the least loaded one below `max_streams`;
/// else wait for one being opened, or open one.
pub fn decide(active: &[usize], pending: usize, spread: usize, max_streams: usize) -> Decision {
    let least = active
        .iter()
        .enumerate()
        .filter(|(_, a)| **a < max_streams)
        .min_by_key(|(_, a)| **a);
    match least {
        Some((i, 0)) => Decision::Use(i),
        _ if active.len() + pending < spread => Decision::Open,
        Some((i, _)) => Decision::Use(i),
        None if pending > 0 => Decision::Wait,
        None => Decision::Open,
    }
}

pub struct Pool {
    cfg: PoolConfig,
    tls: Arc<TlsContext>,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    opened: Notify,
    next_id: AtomicU64,
}

impl Pool {
    pub fn new(cfg: PoolConfig, tls: Arc<TlsContext>) -> Pool {
        Pool {
            cfg,
            tls,
            entries: Mutex::default(),
            opened: Notify::new(),
            next_id: AtomicU64::new(1),
        }
    }

    fn pick(&self, key: &PoolKey) -> Pick {
        let mut entries = self.entries.lock().unwrap();
        let e = entries.entry(key.clone()).or_default();
        e.conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let active: Vec<usize> = e
            .conns
            .iter()
            .map(|c| c.active.load(Ordering::Acquire))
            .collect();
        match decide(&active, e.pending, self.cfg.spread, self.cfg.max_streams) {
            Decision::Use(i) => {
                let c = e.conns[i].clone();
                c.active.fetch_add(1, Ordering::AcqRel);
                c.total.fetch_add(1, Ordering::Relaxed);
                Pick::Use(c)
            }
            Decision::Open => {
                e.pending += 1;
                Pick::Open
            }
            Decision::Wait => Pick::Wait,
        }
    }

    /// Opens a CONNECT stream for `key` and waits for its response, which must be 200; what
    /// the client sends meanwhile goes out on the stream already (see [`Early`]). Without a
    /// client socket (`early` None: the waypoint speaks HTTP on the stream itself) nothing is
    /// sent before the response.
    pub async fn connect(
        &self,
        key: &PoolKey,
        req: &ConnectRequest,
        mut early: Option<&mut Early<'_>>,
    ) -> Result<(H2Stream, StreamGuard), Error> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = match self.pick(key) {
                Pick::Use(c) => c,
                Pick::Wait => {
                    let _ = tokio::time::timeout(Duration::from_millis(50), self.opened.notified())
                        .await;
                    continue;
                }
                Pick::Open => {
                    let res = self.dial(key).await;
                    let mut entries = self.entries.lock().unwrap();
                    let e = entries.entry(key.clone()).or_default();
                    e.pending -= 1;
                    let conn = match res {
                        Ok(c) => {
                            c.active.store(1, Ordering::Release);
                            c.total.store(1, Ordering::Relaxed);
                            let c = Arc::new(c);
                            e.conns.push(c.clone());
                            c
                        }
                        Err(err) => {
                            if e.conns.is_empty() && e.pending == 0 {
                                entries.remove(key);
                            }
                            drop(entries);
                            self.opened.notify_waiters();
                            return Err(err);
                        }
                    };
                    drop(entries);
                    self.opened.notify_waiters();
                    conn
                }
            };
            let guard = StreamGuard { conn };
            let exchange = Self::exchange(&guard.conn, req.build(), early.as_deref_mut());
            match tokio::time::timeout(self.cfg.connect_timeout, exchange).await {
                Err(_) => return Err(Error::Timeout("CONNECT response")),
                Ok(Ok(s)) => return Ok((s, guard)),
                // The stream failed before any response: the connection died under us (peer
                // restarted, GOAWAY) or refused the stream. Try again, on a new connection
                // unless only this stream was reset.
                Ok(Err(Error::H2(e))) if attempts < 3 => {
                    if !e.is_reset() {
                        guard.conn.closed.store(true, Ordering::Release);
                    }
                    tracing::debug!(dst = %key.dst, error = %e, "retrying CONNECT");
                    continue;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Sends the CONNECT (and what an earlier attempt sent early), forwards the client's bytes
    /// until the response arrives, and checks it.
    async fn exchange(
        conn: &Conn,
        req: http::Request<()>,
        early: Option<&mut Early<'_>>,
    ) -> Result<H2Stream, Error> {
        let mut sender = conn.sender.clone().ready().await.map_err(Error::H2)?;
        let (response, mut send) = sender.send_request(req, false).map_err(Error::H2)?;
        let resp = match early {
            None => response.await.map_err(Error::H2)?,
            Some(early) => {
                early.replay(&mut send).map_err(Error::H2)?;
                tokio::pin!(response);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut response => break r.map_err(Error::H2)?,
                        r = early.forward_more(&mut send), if early.wants_more() => match r {
                            Ok(()) => {}
                            Err(EarlyError::Stream(e)) => return Err(Error::H2(e)),
                            Err(EarlyError::Client(e)) => return Err(Error::Io(e)),
                        },
                    }
                }
            }
        };
        if resp.status() != http::StatusCode::OK {
            return Err(Error::Status(resp.status()));
        }
        Ok(H2Stream {
            send,
            recv: resp.into_body(),
        })
    }

    async fn dial(&self, key: &PoolKey) -> Result<Conn, Error> {
        let tcp = socket::connect(
            key.src_ip,
            key.dst,
            self.cfg.transparent,
            self.cfg.connect_timeout,
        )
        .await
        .map_err(|e| Error::Connect(key.dst, e))?;
        let cfg = self
            .tls
            .client_config(&key.src_identity, &key.dst_identities)
            .map_err(|e| Error::Tls(std::io::Error::other(e)))?;
        let name = ServerName::IpAddress(key.dst.ip().into());
        let handshake = async {
            let tls = TlsConnector::from(cfg)
                .connect(name, socket::BufIo::new(tcp))
                .await
                .map_err(Error::Tls)?;
            client_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(Error::H2)
        };
        let (sender, connection) = tokio::time::timeout(self.cfg.connect_timeout, handshake)
            .await
            .map_err(|_| Error::Timeout("TLS/HTTP2 handshake"))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let dst = key.dst;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%dst, conn = id, error = %e, "pooled connection ended");
            }
            flag.store(true, Ordering::Release);
        });
        tracing::debug!(%dst, conn = id, src = %key.src_identity, "pooled connection opened");
        Ok(Conn {
            id,
            sender,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            created: Instant::now(),
            idle_since: Mutex::new(Instant::now()),
            closed,
        })
    }

    /// Drops connections idle longer than the timeout (and dead ones).
    pub fn reap(&self) -> usize {
        let mut entries = self.entries.lock().unwrap();
        let mut dropped = 0;
        for e in entries.values_mut() {
            let before = e.conns.len();
            e.conns.retain(|c| {
                !c.closed.load(Ordering::Acquire)
                    && (c.active.load(Ordering::Acquire) > 0
                        || c.idle_since.lock().unwrap().elapsed() < self.cfg.idle_timeout)
            });
            dropped += before - e.conns.len();
        }
        entries.retain(|_, e| !e.conns.is_empty() || e.pending > 0);
        dropped
    }

    pub async fn reaper(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let every =
            (self.cfg.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let n = self.reap();
            if n > 0 {
                tracing::debug!(closed = n, "idle pooled connections closed");
            }
        }
    }

    /// Number of live connections (all keys).
    pub fn connections(&self) -> usize {
        self.entries
            .lock()
            .unwrap()
            .values()
            .map(|e| {
                e.conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    pub fn dump(&self) -> serde_json::Value {
        let entries = self.entries.lock().unwrap();
        let list: Vec<_> = entries
            .iter()
            .map(|(k, e)| {
                let conns: Vec<_> = e
                    .conns
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "activeStreams": c.active.load(Ordering::Acquire),
                            "totalStreams": c.total.load(Ordering::Relaxed),
                            "ageSeconds": c.created.elapsed().as_secs(),
                            "closed": c.closed.load(Ordering::Acquire),
                        })
                    })
                    .collect();
                serde_json::json!({ "key": k, "pending": e.pending, "connections": conns })
            })
            .collect();
        serde_json::json!({
            "maxStreamsPerConnection": self.cfg.max_streams,
            "spread": self.cfg.spread,
            "idleTimeoutSeconds": self.cfg.idle_timeout.as_secs_f64(),
            "keys": list,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_first_then_spread_then_least_loaded_then_more() {
        use Decision::*;
        // Nothing yet: open.
        assert_eq!(decide(&[], 0, 2, 100), Open);
        // One being opened, spread 2: open a second rather than wait.
        assert_eq!(decide(&[], 1, 2, 100), Open);
        // An idle connection is always taken.
        assert_eq!(decide(&[3, 0], 0, 2, 100), Use(1));
        // One busy connection, spread 2: a second one.
        assert_eq!(decide(&[1], 0, 2, 100), Open);
        // Spread reached: the least loaded.
        assert_eq!(decide(&[5, 2], 0, 2, 100), Use(1));
        assert_eq!(decide(&[5], 1, 2, 100), Use(0));
        // All full: wait for the one being opened, else open another.
        assert_eq!(decide(&[100, 100], 1, 2, 100), Wait);
        assert_eq!(decide(&[100, 100], 0, 2, 100), Open);
        // Spread 1: everything multiplexes on one connection until it is full.
        assert_eq!(decide(&[7], 0, 1, 100), Use(0));
    }
}
