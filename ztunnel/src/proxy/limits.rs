//! Per-source caps on concurrent connections.
//!
//! Every connection holds descriptors, buffers and a task of the one process all of a node's
//! pods share. Without a cap, one pod opening connections as fast as it can (or a client
//! outside the mesh holding thousands of stalled handshakes on 15008) takes the descriptors
//! until `accept` fails with EMFILE for everybody. With it, the flooding source is refused at
//! its cap (logged once per cause, counted in `ztunnel_refused_connections_total`) while every
//! other source keeps being served.
//!
//! A source is a workload (by uid) when it is one, else its address. Counts are per source
//! across the listeners: a pod's outbound connections, its HBONE streams into this node and
//! its plaintext connections all count towards the one cap; a peer address's TCP connections
//! on 15008 (counted from the accept, before the handshake says who it is) count under that
//! address.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::Error;
use crate::state::Workload;

/// Who a connection is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A workload's uid.
    Workload(String),
    /// An address that is no workload we know (or a 15008 peer before its handshake).
    Addr(IpAddr),
}

impl Source {
    /// The workload if there is one, else the address.
    pub fn of(workload: Option<&Workload>, ip: IpAddr) -> Source {
        match workload {
            Some(w) => Source::Workload(w.uid.clone()),
            None => Source::Addr(ip.to_canonical()),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Workload(uid) => write!(f, "workload {uid}"),
            Source::Addr(ip) => write!(f, "address {ip}"),
        }
    }
}

/// The concurrent connections of every source that holds one.
pub struct Limits {
    /// 0: no cap (nothing is counted).
    max: usize,
    // An entry exists only while its source holds a connection: the map is as large as the
    // number of sources connected right now, not of sources ever seen.
    held: Mutex<HashMap<Source, usize>>,
}

/// One connection's place under its source's cap; dropping it frees the place.
#[must_use = "the place is freed when the permit is dropped"]
pub struct Permit {
    held: Option<(Arc<Limits>, Source)>,
}

impl Limits {
    pub fn new(max: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max,
            held: Mutex::default(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection of `source`, or [`Error::ConnectionLimit`] when it
    /// already holds `max`.
    pub fn acquire(self: &Arc<Self>, source: Source) -> Result<Permit, Error> {
        if self.max == 0 {
            return Ok(Permit { held: None });
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(source.clone()).or_insert(0);
        if *n >= self.max {
            return Err(Error::ConnectionLimit(source.to_string(), self.max));
        }
        *n += 1;
        Ok(Permit {
            held: Some((self.clone(), source)),
        })
    }

    /// Connections `source` holds now.
    pub fn held_by(&self, source: &Source) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(source).copied().unwrap_or(0)
    }

    /// Sources holding at least one connection.
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn release(&self, source: &Source) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(source);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((limits, source)) = self.held.take() {
            limits.release(&source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str) -> Source {
        Source::Workload(uid.into())
    }

    #[test]
    fn a_source_at_its_cap_is_refused_and_others_are_not() {
        let l = Limits::new(3);
        let mut held: Vec<Permit> = (0..3).map(|_| l.acquire(pod("flood")).unwrap()).collect();
        let e = l.acquire(pod("flood")).err().expect("the 4th is refused");
        assert_eq!(e.refusal(), Some("connection-limit"));
        assert!(e.to_string().contains("workload flood"), "{e}");
        // Another pod, or an address, is counted on its own.
        let _other = l.acquire(pod("victim")).unwrap();
        let _addr = l
            .acquire(Source::Addr("10.0.0.9".parse().unwrap()))
            .unwrap();
        assert_eq!(l.held_by(&pod("flood")), 3);
        assert_eq!(l.sources(), 3);
        // One closed: one more admitted.
        held.pop();
        let again = l.acquire(pod("flood")).unwrap();
        assert_eq!(l.held_by(&pod("flood")), 3);
        drop(again);
        assert_eq!(l.held_by(&pod("flood")), 2);
        drop(held);
        assert_eq!(l.held_by(&pod("flood")), 0);
    }

    #[test]
    fn entries_go_when_their_last_connection_closes() {
        let l = Limits::new(10);
        for i in 0..100 {
            let p = l.acquire(Source::Addr(format!("10.0.1.{i}").parse().unwrap()));
            drop(p.unwrap());
        }
        assert_eq!(l.sources(), 0, "the map must not grow with sources seen");
    }

    #[test]
    fn zero_is_no_cap() {
        let l = Limits::new(0);
        let held: Vec<Permit> = (0..10_000).map(|_| l.acquire(pod("x")).unwrap()).collect();
        assert_eq!(held.len(), 10_000);
        assert_eq!(l.sources(), 0, "nothing is counted without a cap");
    }

    #[test]
    fn a_mapped_v4_address_is_its_v4_twin() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(None, mapped), Source::of(None, v4));
        let l = Limits::new(1);
        let _p = l.acquire(Source::of(None, v4)).unwrap();
        assert!(l.acquire(Source::of(None, mapped)).is_err());
    }
}
