//! The controller: makes the node's enrolled pods and ztunnel match what the watch cache says,
//! and keeps the `ambient.istio.io/redirection: enabled` annotation on exactly the pods that
//! are enrolled. Level-triggered: every pass compares the whole (small) node against the
//! whole cache, so a missed or coalesced event, a re-list or a failed step is repaired by the
//! next pass. Passes run on every cache change, on a retry timer after a failure, and on a
//! periodic sweep.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_net::consts::membership::{
    REDIRECTION_ANNOTATION, REDIRECTION_DISABLED, REDIRECTION_ENABLED,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::{Mutex, Notify};
use tracing::{debug, info, warn};

use super::cache::{PodFacts, SharedCache};
use super::dataplane::{Dataplane, Enrolled};
use super::watch::Backoff;
use crate::membership::Verdict;

/// The field manager named in the agent's patches.
pub const FIELD_MANAGER: &str = "ambient-agent";

type PodKey = (String, String);

pub struct Controller<D: Dataplane> {
    cache: SharedCache,
    dataplane: Arc<Mutex<D>>,
    client: Client,
    changed: Arc<Notify>,
    /// Set after the first pass over a complete cache (the agent's readiness).
    ready: Arc<AtomicBool>,
    /// Annotation patches sent and not yet seen in the cache: the pod's resourceVersion when
    /// it was patched, and the value sent. A pod is not patched again until its
    /// resourceVersion moves.
    patched: BTreeMap<PodKey, (String, Option<String>)>,
    /// The last failure per pod, so a persistent one is logged once, not every pass.
    failing: BTreeMap<PodKey, String>,
}

impl<D: Dataplane> Controller<D> {
    pub fn new(
        cache: SharedCache,
        dataplane: Arc<Mutex<D>>,
        client: Client,
        changed: Arc<Notify>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            cache,
            dataplane,
            client,
            changed,
            ready,
            patched: BTreeMap::new(),
            failing: BTreeMap::new(),
        }
    }

    /// Runs passes forever: on change, after `sweep` without one, and on a backoff after a
    /// pass that left something undone.
    pub async fn run(mut self, sweep: Duration) {
        let mut backoff = Backoff::new();
        let mut wait = sweep;
        loop {
            tokio::select! {
                _ = self.changed.notified() => {
                    // Let a burst of events (a re-list, a namespace with many pods) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            wait = if self.pass().await {
                backoff.reset();
                sweep
            } else {
                backoff.next_delay().min(sweep)
            };
        }
    }

    /// One pass; true when everything the cache asks for is in place.
    pub async fn pass(&mut self) -> bool {
        let (desired, pods, node) = {
            let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if !c.synced() {
                return true;
            }
            let node = c.policy.node_name.clone();
            let pods: BTreeMap<PodKey, (PodFacts, Verdict)> = c
                .pods()
                .filter(|p| p.node_name.as_deref() == Some(node.as_str()))
                .map(|p| (p.key(), (p.clone(), c.verdict(p))))
                .collect();
            (c.desired(), pods, node)
        };
        let mut done = true;
        let enrolled = {
            let dataplane = self.dataplane.clone();
            let mut dp = dataplane.lock().await;

            // The ztunnel first: pods enrolled after it are captured at once.
            let have = dp.ztunnel();
            let same = match (&desired.ztunnel, &have) {
                (Some(w), Some(h)) => {
                    h.namespace == w.namespace
                        && h.name == w.name
                        && w.ips.iter().any(|ip| h.ips.contains(ip))
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                let key = desired
                    .ztunnel
                    .as_ref()
                    .map(|p| p.key())
                    .unwrap_or_default();
                match dp.set_ztunnel(desired.ztunnel.as_ref()).await {
                    Ok(()) => {
                        match &desired.ztunnel {
                            Some(p) => {
                                info!(pod = %p.display(), ips = ?p.ips, node = %node, "ztunnel on this node")
                            }
                            None => info!(node = %node, "no ztunnel on this node: capture stops"),
                        }
                        self.recovered(&key);
                    }
                    Err(e) => {
                        done = false;
                        self.failed(&key, "cannot use the ztunnel pod", &e);
                    }
                }
            }

            // Removals: pods no longer ambient, gone, replaced by a new pod of the name, or
            // with a new address (a new sandbox whose CNI ADD the agent did not see).
            for e in dp.enrolled() {
                let key = (e.namespace.clone(), e.name.clone());
                let why = match (desired.pods.get(&key), pods.get(&key)) {
                    // A fresh CNI enrollment may be ahead of the pod's status in the cache.
                    (Some(p), _) if e.is(p) && (e.fresh || same_address(&e, p)) => continue,
                    (Some(p), _) if e.is(p) => "the pod's address changed",
                    (Some(_), _) => "replaced by a new pod of the same name",
                    (None, Some((_, v))) => v.reason(),
                    // Not in the cache: deleted, unless its CNI ADD just beat the watch event.
                    (None, None) if e.fresh => continue,
                    (None, None) => "pod no longer exists on this node",
                };
                match dp.remove(&e).await {
                    Ok(()) => {
                        info!(pod = %format!("{}/{}", e.namespace, e.name), reason = why, "un-enrolled")
                    }
                    Err(err) => {
                        done = false;
                        self.failed(&key, "cannot un-enroll", &err);
                    }
                }
            }

            // Enrollments: through the same path as CNI ADD.
            let current = dp.enrolled();
            for p in desired.pods.values() {
                if current.iter().any(|e| e.is(p)) {
                    continue;
                }
                match dp.enroll(p).await {
                    Ok(()) => {
                        info!(pod = %p.display(), ips = ?p.ips, "enrolled from the API");
                        self.recovered(&p.key());
                    }
                    Err(e) => {
                        done = false;
                        self.failed(&p.key(), "cannot enroll", &e);
                    }
                }
            }
            dp.enrolled()
        };

        // The annotation follows the enrollment (never over the user's `disabled`).
        self.patched.retain(|k, _| pods.contains_key(k));
        self.failing
            .retain(|k, _| pods.contains_key(k) || k.0.is_empty());
        for (key, (p, _)) in &pods {
            let is_enrolled = enrolled.iter().any(|e| e.is(p));
            let current = p.redirection.as_deref();
            let want = match (is_enrolled, current) {
                (_, Some(REDIRECTION_DISABLED)) => continue,
                (true, Some(REDIRECTION_ENABLED)) | (false, None) => {
                    self.patched.remove(key);
                    continue;
                }
                (false, Some(REDIRECTION_ENABLED)) => None,
                (false, Some(_)) => continue,
                (true, _) => Some(REDIRECTION_ENABLED.to_string()),
            };
            if self.patched.get(key) == Some(&(p.resource_version.clone(), want.clone())) {
                continue;
            }
            match self.annotate(p, want.as_deref()).await {
                Ok(()) => {
                    debug!(pod = %p.display(), value = ?want, "annotated");
                    self.patched
                        .insert(key.clone(), (p.resource_version.clone(), want));
                }
                Err(kube::Error::Api(r)) if r.code == 404 => {}
                Err(e) => {
                    done = false;
                    self.failed(key, "cannot annotate", &anyhow::Error::new(e));
                }
            }
        }
        if !self.ready.swap(true, Ordering::AcqRel) {
            info!(
                enrolled = enrolled.len(),
                "first pass over the synced watch cache done"
            );
        }
        done
    }

    /// JSON merge patch of the redirection annotation (`None` removes it).
    async fn annotate(&self, p: &PodFacts, value: Option<&str>) -> Result<(), kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace);
        let body = serde_json::json!({
            "metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.patch(&p.name, &params, &Patch::Merge(&body)).await?;
        Ok(())
    }

    fn failed(&mut self, key: &PodKey, what: &str, e: &anyhow::Error) {
        let msg = format!("{what}: {e:#}");
        if self.failing.get(key) != Some(&msg) {
            warn!(pod = %format!("{}/{}", key.0, key.1), "{msg} (retrying)");
            self.failing.insert(key.clone(), msg);
        }
    }

    fn recovered(&mut self, key: &PodKey) {
        if self.failing.remove(key).is_some() {
            info!(pod = %format!("{}/{}", key.0, key.1), "recovered");
        }
    }
}

/// Does the enrollment hold one of the pod's current addresses?
fn same_address(e: &Enrolled, p: &PodFacts) -> bool {
    p.ips.iter().any(|ip| e.ips.contains(ip))
}
