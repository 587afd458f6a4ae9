//! One watcher per resource (namespaces, pods, services, EndpointSlices; all cluster-wide),
//! each keeping its [`Table`] of the [`Store`] current.
//!
//! kube-runtime's `watcher` speaks the list/watch protocol: a paged list whose
//! resourceVersion starts the watch, resumption from the last event's or bookmark's
//! resourceVersion when the server ends a watch, and a fresh list after an `ERROR` event with
//! 410 Gone. On top of it:
//!
//! * a list is collected and swapped in as a whole when it is complete, so an object deleted
//!   while the watch was broken disappears, and half a list is never seen;
//! * a watch *request* answered with HTTP 410 (instead of a 200 and an `ERROR` event) makes
//!   kube-runtime 2.0 retry the same expired resourceVersion forever: such an error restarts
//!   the watcher, i.e. a fresh list;
//! * errors are retried after a backoff (100 ms doubling to 30 s, reset by any event).

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::facts::{Key, NsFacts, PodFacts, ServiceFacts, SliceFacts, Store, Table};

/// A store of [`Table`]s the watchers fill: discovery's [`Store`], or another component's
/// (the waypoint's routes and policies).
pub trait Tables: Send + 'static {
    /// Something changed since the last build.
    fn mark_dirty(&mut self);
}

impl Tables for Store {
    fn mark_dirty(&mut self) {
        self.dirty = true;
    }
}

/// A resource a watcher keeps in a table of `S` (discovery's [`Store`] by default).
pub trait Watched<S: Tables = Store>:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    type Facts: Send + 'static;
    const WHAT: &'static str;
    fn facts(&self) -> Self::Facts;
    fn table(store: &mut S) -> &mut Table<Self::Facts>;
}

impl Watched for Namespace {
    type Facts = NsFacts;
    const WHAT: &'static str = "namespaces";
    fn facts(&self) -> NsFacts {
        NsFacts::from_namespace(self)
    }
    fn table(store: &mut Store) -> &mut Table<NsFacts> {
        &mut store.namespaces
    }
}

impl Watched for Pod {
    type Facts = PodFacts;
    const WHAT: &'static str = "pods";
    fn facts(&self) -> PodFacts {
        PodFacts::from_pod(self)
    }
    fn table(store: &mut Store) -> &mut Table<PodFacts> {
        &mut store.pods
    }
}

impl Watched for Service {
    type Facts = ServiceFacts;
    const WHAT: &'static str = "services";
    fn facts(&self) -> ServiceFacts {
        ServiceFacts::from_service(self)
    }
    fn table(store: &mut Store) -> &mut Table<ServiceFacts> {
        &mut store.services
    }
}

impl Watched for EndpointSlice {
    type Facts = SliceFacts;
    const WHAT: &'static str = "endpointslices";
    fn facts(&self) -> SliceFacts {
        SliceFacts::from_slice(self)
    }
    fn table(store: &mut Store) -> &mut Table<SliceFacts> {
        &mut store.slices
    }
}

/// (key, uid) of an object; `None` without a name.
fn identify<K: Resource>(obj: &K) -> Option<(Key, String)> {
    let m = obj.meta();
    let key = (m.namespace.clone().unwrap_or_default(), m.name.clone()?);
    Some((key, m.uid.clone().unwrap_or_default()))
}

/// 100 ms doubling to 30 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(30);

    pub fn new() -> Backoff {
        Backoff(Self::FIRST)
    }

    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    pub fn delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(Self::CAP);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A watch request refused with HTTP 410: kube-runtime would retry it unchanged.
fn watch_request_gone(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::WatchStartFailed(kube::Error::Api(r))
            | watcher::Error::WatchFailed(kube::Error::Api(r)) if r.code == 410
    )
}

fn lock<S>(store: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `K`'s table current until `stop`; `changed` is notified after every change (and
/// error, for the status).
pub async fn run<K: Watched>(
    api: Api<K>,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) {
    run_with(api, watcher::Config::default(), store, changed, stop).await
}

/// [`run`] into any store of tables, with a watcher config (e.g. a field selector).
pub async fn run_with<S: Tables, K: Watched<S>>(
    api: Api<K>,
    config: watcher::Config,
    store: Arc<Mutex<S>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) {
    let start = || watcher(api.clone(), config.clone()).boxed();
    let mut stream = start();
    let mut listing: Option<Vec<(Key, String, K::Facts)>> = None;
    let mut backoff = Backoff::new();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = stream.next() => next,
        };
        match next {
            Some(Ok(ev)) => {
                backoff.reset();
                let mut st = lock(&store);
                K::table(&mut st).last_error = None;
                drop(st);
                match ev {
                    Event::Init => listing = Some(Vec::new()),
                    Event::InitApply(obj) => {
                        if let Some((key, uid)) = identify(&obj) {
                            listing
                                .get_or_insert_with(Vec::new)
                                .push((key, uid, obj.facts()));
                        }
                    }
                    Event::InitDone => {
                        let all = listing.take().unwrap_or_default();
                        tracing::debug!(what = K::WHAT, count = all.len(), "listed");
                        let mut st = lock(&store);
                        let t = K::table(&mut st);
                        t.items = all.into_iter().map(|(k, u, f)| (k, (u, f))).collect();
                        t.listed = true;
                        t.lists += 1;
                        st.mark_dirty();
                        drop(st);
                        changed.notify_one();
                    }
                    Event::Apply(obj) => {
                        if let Some((key, uid)) = identify(&obj) {
                            let mut st = lock(&store);
                            K::table(&mut st).items.insert(key, (uid, obj.facts()));
                            st.mark_dirty();
                            drop(st);
                            changed.notify_one();
                        }
                    }
                    Event::Delete(obj) => {
                        if let Some((key, uid)) = identify(&obj) {
                            let mut st = lock(&store);
                            let t = K::table(&mut st);
                            // Only the object deleted, not a successor of the same name.
                            if t.items
                                .get(&key)
                                .is_some_and(|(u, _)| uid.is_empty() || *u == uid)
                            {
                                t.items.remove(&key);
                                st.mark_dirty();
                            }
                            drop(st);
                            changed.notify_one();
                        }
                    }
                }
            }
            Some(Err(e)) => {
                let delay = backoff.delay();
                if watch_request_gone(&e) {
                    tracing::info!(what = K::WHAT, "watch refused with 410 Gone: listing again");
                    stream = start();
                    listing = None;
                } else if matches!(&e, watcher::Error::WatchError(r) if r.code == 410) {
                    // kube-runtime lists again by itself.
                    tracing::info!(what = K::WHAT, "resourceVersion expired: listing again");
                } else {
                    tracing::warn!(what = K::WHAT, error = %e, ?delay, "watch failed; retrying");
                }
                K::table(&mut lock(&store)).last_error = Some(format!(
                    "{}: {e}",
                    crate::identity::rfc3339(std::time::SystemTime::now())
                ));
                changed.notify_one();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            None => {
                // The watcher's stream does not end; if it ever does, start over.
                stream = start();
                listing = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..5).map(|_| b.delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600]);
        for _ in 0..30 {
            b.delay();
        }
        assert_eq!(b.delay(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.delay(), Duration::from_millis(100));
    }
}
