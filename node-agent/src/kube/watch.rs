//! The watchers: namespaces (all of them: few, small, and knowing every namespace lets the
//! agent tell "not ambient" from "not seen yet") and the pods on this node (field selector
//! `spec.nodeName=<node>`), each feeding the watch cache.
//!
//! kube-runtime's `watcher` does the list/watch protocol: a paged list whose
//! `metadata.resourceVersion` starts the watch, the watch resumed from the last event's or
//! bookmark's resourceVersion when the server closes it, and a fresh list when the server
//! answers 410 Gone with an `ERROR` event. Here: a complete list replaces the cache
//! atomically (objects missing from a re-list are deleted), errors are retried with an
//! exponential backoff, and a watch *request* answered with HTTP 410 instead of an `ERROR`
//! event (kube-runtime 2.0 would retry it with the same expired resourceVersion forever)
//! restarts from a fresh list.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::cache::{Cache, NsFacts, PodFacts, SharedCache};

/// An API type the cache keeps facts of.
pub trait Cached: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    type Facts: Send;
    const WHAT: &'static str;
    fn facts(&self) -> Option<Self::Facts>;
    fn apply(cache: &mut Cache, facts: Self::Facts);
    fn delete(cache: &mut Cache, obj: &Self);
    fn replace(cache: &mut Cache, all: Vec<Self::Facts>);
}

impl Cached for Namespace {
    type Facts = NsFacts;
    const WHAT: &'static str = "namespaces";
    fn facts(&self) -> Option<NsFacts> {
        NsFacts::from_namespace(self)
    }
    fn apply(cache: &mut Cache, facts: NsFacts) {
        cache.apply_namespace(facts);
    }
    fn delete(cache: &mut Cache, obj: &Self) {
        if let Some(name) = &obj.metadata.name {
            cache.delete_namespace(name);
        }
    }
    fn replace(cache: &mut Cache, all: Vec<NsFacts>) {
        cache.replace_namespaces(all);
    }
}

impl Cached for Pod {
    type Facts = PodFacts;
    const WHAT: &'static str = "pods";
    fn facts(&self) -> Option<PodFacts> {
        PodFacts::from_pod(self)
    }
    fn apply(cache: &mut Cache, facts: PodFacts) {
        cache.apply_pod(facts);
    }
    fn delete(cache: &mut Cache, obj: &Self) {
        let m = &obj.metadata;
        if let (Some(ns), Some(name)) = (&m.namespace, &m.name) {
            // Only the pod that was deleted, not a successor of the same name.
            let same = cache
                .pod(ns, name)
                .is_some_and(|p| m.uid.is_none() || m.uid.as_deref() == Some(p.uid.as_str()));
            if same {
                cache.delete_pod(ns, name);
            }
        }
    }
    fn replace(cache: &mut Cache, all: Vec<PodFacts>) {
        cache.replace_pods(all);
    }
}

/// Exponential backoff between retries: 100 ms doubling to 30 s, reset by success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(r))
        | watcher::Error::WatchFailed(kube::Error::Api(r))
        | watcher::Error::InitialListFailed(kube::Error::Api(r)) => r.code == 410,
        watcher::Error::WatchError(r) => r.code == 410,
        _ => false,
    }
}

/// Keeps the cache's view of `K` current, forever. `changed` is signalled after every
/// change of the cache.
pub async fn run<K: Cached>(
    api: Api<K>,
    config: watcher::Config,
    cache: SharedCache,
    changed: Arc<Notify>,
) {
    let start = || watcher(api.clone(), config.clone()).boxed();
    let mut stream = start();
    let mut listing: Option<Vec<K::Facts>> = None;
    let mut backoff = Backoff::new();
    loop {
        match stream.next().await {
            Some(Ok(ev)) => {
                backoff.reset();
                match ev {
                    Event::Init => listing = Some(Vec::new()),
                    Event::InitApply(obj) => {
                        if let Some(f) = obj.facts() {
                            listing.get_or_insert_with(Vec::new).push(f);
                        }
                    }
                    Event::InitDone => {
                        let all = listing.take().unwrap_or_default();
                        info!(what = K::WHAT, count = all.len(), "listed");
                        K::replace(&mut write(&cache), all);
                        changed.notify_one();
                    }
                    Event::Apply(obj) => {
                        if let Some(f) = obj.facts() {
                            K::apply(&mut write(&cache), f);
                            changed.notify_one();
                        }
                    }
                    Event::Delete(obj) => {
                        K::delete(&mut write(&cache), &obj);
                        changed.notify_one();
                    }
                }
            }
            Some(Err(e)) => {
                let delay = backoff.next_delay();
                if is_gone(&e) {
                    info!(
                        what = K::WHAT,
                        "resourceVersion expired (410 Gone): re-listing"
                    );
                    // An ERROR event or a failed list already sends the watcher back to a
                    // list; a watch request answered with HTTP 410 (a status line instead
                    // of events) would be retried with the same resourceVersion forever.
                    if matches!(
                        e,
                        watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_)
                    ) {
                        stream = start();
                        listing = None;
                    }
                } else {
                    warn!(what = K::WHAT, ?delay, "watch: {e}; retrying");
                }
                tokio::time::sleep(delay).await;
            }
            None => {
                debug!(what = K::WHAT, "watch stream ended; restarting");
                stream = start();
                listing = None;
            }
        }
    }
}

fn write(cache: &SharedCache) -> std::sync::RwLockWriteGuard<'_, Cache> {
    cache.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let first: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(first, [100, 200, 400, 800]);
        for _ in 0..20 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
