//! An in-process fake Kubernetes API server (HTTP/1.1, hyper) holding namespaces, pods,
//! services and EndpointSlices and speaking the real list/watch protocol, for the Kubernetes-mode
//! tests of the agent and of ztunnel (which includes this file by path):
//!
//! * `GET /api/v1/namespaces`, `/api/v1/pods`, `/api/v1/namespaces/<ns>/pods`, the same for
//!   `services`, and `/apis/discovery.k8s.io/v1[/namespaces/<ns>]/endpointslices`: a
//!   `<Kind>List` with `metadata.resourceVersion`; `labelSelector` (equality-based), `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`), `limit` +
//!   `continue` paging (a continue token older than a change answers 410 Expired, as a
//!   compacted one does).
//! * `?watch=true&resourceVersion=<rv>`: a chunked stream of newline-delimited JSON events
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}`, starting with every event
//!   after `<rv>` (or synthetic ADDEDs of the current objects for `0`/empty). An object that
//!   stops matching the selector is sent as DELETED, one that starts matching as ADDED, as
//!   the API server's watch cache does. A resourceVersion older than the compaction point is
//!   answered with an `ERROR` event carrying a `Status` 410 Expired (what a real API server
//!   does), or with HTTP 410 when the test asks for it. `timeoutSeconds` closes the stream;
//!   `allowWatchBookmarks` enables [`FakeApiServer::bookmark`].
//! * `GET`/`PATCH` one object; PATCH takes `application/merge-patch+json` (RFC
//!   7386) and emits MODIFIED.
//! * Custom resources too: `Gateway`, `HTTPRoute` (`/apis/gateway.networking.k8s.io/v1`) and
//!   `AuthorizationPolicy` (`/apis/security.istio.io/v1`), with `metadata.generation` (bumped
//!   when the spec changes) and the `status` subresource (`PATCH …/<name>/status` changes
//!   `status` only; the main resource ignores `status`).
//!
//! Every request is logged ([`FakeApiServer::requests`]), PATCH bodies too
//! ([`FakeApiServer::patches`]). Test controls change objects (each change is one
//! resourceVersion and one event), hold events back from open watches, compact history,
//! expire or close watches.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

type Body = BoxBody<Bytes, Infallible>;

/// The resource kinds the fake holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    /// gateway.networking.k8s.io/v1 (a custom resource: `metadata.generation`, `/status`).
    Gateway,
    HttpRoute,
    /// security.istio.io/v1.
    AuthorizationPolicy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Custom resources: the API server keeps `metadata.generation` (bumped by spec changes)
    /// and serves the `status` subresource.
    fn custom(self) -> bool {
        matches!(
            self,
            Kind::Gateway | Kind::HttpRoute | Kind::AuthorizationPolicy
        )
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Gateway | Kind::HttpRoute => "gateway.networking.k8s.io/v1",
            Kind::AuthorizationPolicy => "security.istio.io/v1",
            _ => "v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Gateway => "gateways",
            Kind::HttpRoute => "httproutes",
            Kind::AuthorizationPolicy => "authorizationpolicies",
        }
    }

    fn from_plural(p: &str) -> Option<Kind> {
        [
            Kind::Pod,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Gateway,
            Kind::HttpRoute,
            Kind::AuthorizationPolicy,
        ]
        .into_iter()
        .find(|k| k.plural() == p)
    }
}

/// (kind, namespace ("" for namespaces), name)
type Key = (Kind, String, String);

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    key: Key,
    old: Option<Value>,
    /// `None`: deleted.
    new: Option<Value>,
}

struct Watch {
    id: u64,
    kind: Kind,
    namespace: Option<String>,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches and continue tokens from before this resourceVersion get 410.
    compacted: u64,
    watches: Vec<Watch>,
    next_watch: u64,
    /// Changes are recorded but not delivered to open watches (a stalled connection).
    hold: bool,
    held: Vec<Change>,
    watch_gone_http: bool,
    requests: Vec<String>,
    patches: Vec<(String, String, Value)>,
}

/// A running fake API server; dropping it does not stop it (it lives with the runtime).
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl FakeApiServer {
    /// Serves on 127.0.0.1 at a free port.
    pub async fn start() -> FakeApiServer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(l)
    }

    /// Serves on a listener made elsewhere (e.g. inside another network namespace).
    pub fn start_on(listener: std::net::TcpListener) -> FakeApiServer {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = FakeApiServer {
            state: Arc::new(Mutex::new(State::default())),
            addr,
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.serve(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---------------------------------------------------------------- test controls

    /// Creates or replaces an object (by its `kind`); fills in uid and creationTimestamp when
    /// missing (a replacement keeps the old ones).
    pub fn put(&self, mut obj: Value) {
        let kind = match obj["kind"].as_str() {
            Some("Namespace") => Kind::Namespace,
            Some("Pod") => Kind::Pod,
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Gateway") => Kind::Gateway,
            Some("HTTPRoute") => Kind::HttpRoute,
            Some("AuthorizationPolicy") => Kind::AuthorizationPolicy,
            k => panic!("fake API server holds no {k:?}"),
        };
        obj["apiVersion"] = json!(kind.api_version());
        let key = key_of(kind, &obj);
        let mut st = self.st();
        let old = st.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        for f in ["uid", "creationTimestamp"] {
            if meta.get(f).is_none_or(Value::is_null) {
                meta[f] = match (&old, f) {
                    (Some(o), _) => o["metadata"][f].clone(),
                    (None, "uid") => {
                        st.uid += 1;
                        json!(format!("00000000-0000-4000-8000-{:012x}", st.uid))
                    }
                    (None, _) => json!(timestamp(st.rv + 1)),
                };
            }
        }
        st.commit(key, Some(obj));
    }

    /// Applies a change to a stored object; panics if absent.
    pub fn update(&self, kind: Kind, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let key = (kind, namespace.to_string(), name.to_string());
        let mut st = self.st();
        let mut obj = st
            .objects
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key:?}"));
        f(&mut obj);
        st.commit(key, Some(obj));
    }

    /// Sets (`Some`) or removes (`None`) a namespace label.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        self.update(Kind::Namespace, "", name, |o| {
            set_map_entry(&mut o["metadata"]["labels"], key, value)
        });
    }

    /// Sets or removes a pod annotation.
    pub fn annotate_pod(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) {
        self.update(Kind::Pod, namespace, name, |o| {
            set_map_entry(&mut o["metadata"]["annotations"], key, value)
        });
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_string(), name.to_string());
        let mut st = self.st();
        if st.objects.contains_key(&key) {
            st.commit(key, None);
        }
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.st()
            .objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn resource_version(&self) -> u64 {
        self.st().rv
    }

    /// Forgets history: watches and continue tokens from before now get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.st();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Holds changes back from open watches (`true`), or delivers what was held (`false`).
    pub fn hold_events(&self, hold: bool) {
        let mut st = self.st();
        st.hold = hold;
        if !hold {
            for c in std::mem::take(&mut st.held) {
                st.deliver(&c);
            }
        }
    }

    /// Sends every open watch an `ERROR` event with a 410 Expired `Status`, then closes it
    /// (held events are dropped: the client has to re-list).
    pub fn expire_watches(&self) {
        let mut st = self.st();
        st.held.clear();
        let rv = st.rv;
        for w in std::mem::take(&mut st.watches) {
            let _ = w.tx.unbounded_send(line(&json!({
                "type": "ERROR",
                "object": status(410, "Expired", &format!("too old resource version: {rv}")),
            })));
        }
    }

    /// Closes every open watch stream (the client resumes from its last resourceVersion).
    pub fn close_watches(&self) {
        self.st().watches.clear();
    }

    /// Answer watch requests with an old resourceVersion with HTTP 410 instead of an
    /// `ERROR` event.
    pub fn set_watch_gone_http(&self, on: bool) {
        self.st().watch_gone_http = on;
    }

    /// Sends a BOOKMARK with the current resourceVersion to watches that allow them.
    pub fn bookmark(&self) {
        let st = self.st();
        for w in &st.watches {
            if w.bookmarks {
                let _ = w.tx.unbounded_send(line(&json!({
                    "type": "BOOKMARK",
                    "object": {"kind": w.kind.name(), "apiVersion": w.kind.api_version(),
                               "metadata": {"resourceVersion": st.rv.to_string()}},
                })));
            }
        }
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.st().requests.clone()
    }

    /// (namespace, name, body) of every PATCH so far.
    pub fn patches(&self) -> Vec<(String, String, Value)> {
        self.st().patches.clone()
    }

    pub fn open_watches(&self) -> usize {
        let mut st = self.st();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    // --------------------------------------------------------------------- serving

    async fn serve(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = parse_query(req.uri().query().unwrap_or(""));
        self.st().requests.push(format!(
            "{method} {}",
            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
        ));
        let content_type = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(400, "BadRequest", "unreadable body"),
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // The group's prefix, then the resource path, which must name a kind of that group.
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("v1", rest),
            ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io/v1", rest),
            ["apis", "gateway.networking.k8s.io", "v1", rest @ ..] => {
                ("gateway.networking.k8s.io/v1", rest)
            }
            ["apis", "security.istio.io", "v1", rest @ ..] => ("security.istio.io/v1", rest),
            _ => (".", &[][..]),
        };
        // The status subresource of a custom resource: a PATCH changes `status` only.
        let (rest, status_only) = match rest {
            [head @ .., "status"] if head.len() == 4 => (head, true),
            r => (r, false),
        };
        let found = match rest {
            ["namespaces"] => Some((Kind::Namespace, None, None)),
            ["namespaces", n] => Some((Kind::Namespace, None, Some(*n))),
            [plural] => Kind::from_plural(plural).map(|k| (k, None, None)),
            ["namespaces", ns, plural] => Kind::from_plural(plural).map(|k| (k, Some(*ns), None)),
            ["namespaces", ns, plural, n] => {
                Kind::from_plural(plural).map(|k| (k, Some(*ns), Some(*n)))
            }
            _ => None,
        };
        let (kind, namespace, name) = match found {
            Some(f) if f.0.api_version() == group && (!status_only || f.0.custom()) => f,
            _ => {
                return error(
                    404,
                    "NotFound",
                    &format!("the server could not find {path}"),
                )
            }
        };
        let selector = match Selector::parse(&query) {
            Ok(s) => s,
            Err(e) => return error(400, "BadRequest", &e),
        };
        match (method, name) {
            (Method::GET, None)
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
            {
                self.watch(kind, namespace, selector, &query)
            }
            (Method::GET, None) => self.list(kind, namespace, selector, &query),
            (Method::GET, Some(n)) => match self.get(kind, namespace.unwrap_or(""), n) {
                Some(o) => json_response(200, &o),
                None => not_found(kind, n),
            },
            (Method::PATCH, Some(n)) => {
                if !content_type.starts_with("application/merge-patch+json") {
                    return error(
                        415,
                        "UnsupportedMediaType",
                        &format!("the fake takes merge patches, not {content_type:?}"),
                    );
                }
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return error(400, "BadRequest", "patch is not JSON");
                };
                let ns = namespace.unwrap_or("").to_string();
                let key = (kind, ns.clone(), n.to_string());
                let mut st = self.st();
                let Some(mut obj) = st.objects.get(&key).cloned() else {
                    return not_found(kind, n);
                };
                if status_only {
                    // Only `status` is taken; the rest of the patch is ignored, as the API
                    // server does for the subresource.
                    let status =
                        json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)});
                    merge_patch(&mut obj, &status);
                } else if kind.custom() && patch.get("status").is_some() {
                    // The main resource ignores status changes of a resource with /status.
                    let mut p = patch.clone();
                    p.as_object_mut().map(|m| m.remove("status"));
                    merge_patch(&mut obj, &p);
                } else {
                    merge_patch(&mut obj, &patch);
                }
                let n = if status_only {
                    format!("{n}/status")
                } else {
                    n.to_string()
                };
                st.patches.push((ns, n, patch));
                st.commit(key.clone(), Some(obj));
                json_response(200, &st.objects[&key])
            }
            _ => error(405, "MethodNotAllowed", "method not allowed"),
        }
    }

    fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: Selector,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let st = self.st();
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        // A continue token is "<rv>/<namespace>/<name>" of the first page's list and the
        // last item sent; a change since then makes it stale, like a compacted one.
        let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(tok) => {
                let mut it = tok.splitn(3, '/');
                let rv: u64 = it.next().and_then(|r| r.parse().ok()).unwrap_or(0);
                let after = (
                    it.next().unwrap_or("").to_string(),
                    it.next().unwrap_or("").to_string(),
                );
                let changed = st.history.iter().any(|c| c.rv > rv && c.key.0 == kind);
                if changed || rv < st.compacted {
                    return error(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                    );
                }
                (rv, Some(after))
            }
            None => (st.rv, None),
        };
        let mut items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, ns, _), o)| {
                *k == kind && namespace.is_none_or(|n| n == ns) && selector.matches(o)
            })
            .filter(|((_, ns, name), _)| {
                after
                    .as_ref()
                    .is_none_or(|(ans, aname)| (ns, name) > (ans, aname))
            })
            .map(|(_, o)| {
                // List items carry no kind/apiVersion, as the API server sends them.
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                o
            })
            .collect();
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if items.len() > limit {
            items.truncate(limit);
            let last = &items[limit - 1]["metadata"];
            meta["continue"] = json!(format!(
                "{list_rv}/{}/{}",
                last["namespace"].as_str().unwrap_or(""),
                last["name"].as_str().unwrap_or("")
            ));
            meta["remainingItemCount"] = json!(0);
        }
        json_response(
            200,
            &json!({
                "kind": format!("{}List", kind.name()),
                "apiVersion": kind.api_version(),
                "metadata": meta,
                "items": items,
            }),
        )
    }

    fn watch(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: Selector,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let mut st = self.st();
        let from = query
            .get("resourceVersion")
            .map(String::as_str)
            .unwrap_or("");
        let (tx, rx) = mpsc::unbounded::<Bytes>();
        let id = st.next_watch;
        st.next_watch += 1;
        let w = Watch {
            id,
            kind,
            namespace: namespace.map(str::to_string),
            selector,
            bookmarks: matches!(
                query.get("allowWatchBookmarks").map(String::as_str),
                Some("true" | "1")
            ),
            tx,
        };
        match from {
            "" | "0" => {
                for (k, o) in st.objects.iter() {
                    if w.wants(k) && w.selector.matches(o) {
                        let _ =
                            w.tx.unbounded_send(line(&json!({"type": "ADDED", "object": o})));
                    }
                }
            }
            rv => {
                let Ok(rv) = rv.parse::<u64>() else {
                    return error(
                        400,
                        "BadRequest",
                        &format!("invalid resourceVersion {rv:?}"),
                    );
                };
                if rv < st.compacted {
                    let msg = format!("too old resource version: {rv} ({})", st.compacted);
                    if st.watch_gone_http {
                        return error(410, "Expired", &msg);
                    }
                    let _ = w.tx.unbounded_send(line(&json!({
                        "type": "ERROR", "object": status(410, "Expired", &msg),
                    })));
                    // Closed right after the error, as the API server does.
                    drop(w);
                    return stream_response(rx);
                }
                for c in st.history.iter().filter(|c| c.rv > rv) {
                    w.send(c);
                }
            }
        }
        if let Some(secs) = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
        {
            let state = self.state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .watches
                    .retain(|w| w.id != id);
            });
        }
        st.watches.push(w);
        stream_response(rx)
    }
}

impl State {
    /// One change: a new resourceVersion, stamped on the object, recorded and delivered.
    fn commit(&mut self, key: Key, new: Option<Value>) {
        self.rv += 1;
        let rv = self.rv;
        let old = self.objects.get(&key).cloned();
        let new = new.map(|mut o| {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            if key.0.custom() {
                // generation: 1, bumped when the spec changes (not the status or metadata).
                let gen = match &old {
                    Some(prev) if prev["spec"] == o["spec"] => {
                        prev["metadata"]["generation"].as_i64().unwrap_or(1)
                    }
                    Some(prev) => prev["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
                    None => 1,
                };
                o["metadata"]["generation"] = json!(gen);
            }
            o
        });
        match &new {
            Some(o) => self.objects.insert(key.clone(), o.clone()),
            None => self.objects.remove(&key),
        };
        let change = Change { rv, key, old, new };
        self.history.push(change.clone());
        if self.hold {
            self.held.push(change);
        } else {
            self.deliver(&change);
        }
    }

    fn deliver(&mut self, c: &Change) {
        self.watches.retain(|w| !w.tx.is_closed());
        for w in &self.watches {
            w.send(c);
        }
    }
}

impl Watch {
    fn wants(&self, key: &Key) -> bool {
        key.0 == self.kind && self.namespace.as_ref().is_none_or(|n| *n == key.1)
    }

    /// The event this watch sees for a change, by whether the object matched before/after.
    fn send(&self, c: &Change) {
        if !self.wants(&c.key) {
            return;
        }
        let before = c.old.as_ref().is_some_and(|o| self.selector.matches(o));
        let after = c.new.as_ref().is_some_and(|o| self.selector.matches(o));
        let (ty, obj) = match (before, after, &c.new) {
            (false, true, Some(n)) => ("ADDED", n.clone()),
            (true, true, Some(n)) => ("MODIFIED", n.clone()),
            // Stopped matching: DELETED with the object as it is now.
            (true, false, Some(n)) => ("DELETED", n.clone()),
            (true, false, None) => {
                let mut o = c.old.clone().unwrap_or_default();
                o["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                ("DELETED", o)
            }
            _ => return,
        };
        let _ = self
            .tx
            .unbounded_send(line(&json!({"type": ty, "object": obj})));
    }
}

/// Equality-based label selector and field selector.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    labels: Vec<(String, Op)>,
    fields: Vec<(String, Op)>,
}

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Exists,
    NotExists,
}

impl Selector {
    fn parse(query: &BTreeMap<String, String>) -> Result<Selector, String> {
        let mut s = Selector::default();
        for term in split_terms(query.get("labelSelector")) {
            s.labels.push(parse_term(term, true)?);
        }
        for term in split_terms(query.get("fieldSelector")) {
            let (f, op) = parse_term(term, false)?;
            if !matches!(
                f.as_str(),
                "metadata.name" | "metadata.namespace" | "spec.nodeName" | "status.phase"
            ) {
                return Err(format!("field label not supported: {f}"));
            }
            s.fields.push((f, op));
        }
        Ok(s)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|(k, op)| {
            let v = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq(want) => v == Some(want.as_str()),
                Op::Ne(want) => v != Some(want.as_str()),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        });
        let field_ok = self.fields.iter().all(|(f, op)| {
            let mut v = obj;
            for part in f.split('.') {
                v = &v[part];
            }
            // An unset field compares as the empty string.
            let v = v.as_str().unwrap_or("");
            match op {
                Op::Eq(want) => v == want,
                Op::Ne(want) => v != want,
                _ => false,
            }
        });
        label_ok && field_ok
    }
}

fn split_terms(s: Option<&String>) -> impl Iterator<Item = &str> {
    s.map(|s| s.split(',').map(str::trim).filter(|t| !t.is_empty()))
        .into_iter()
        .flatten()
}

fn parse_term(t: &str, label: bool) -> Result<(String, Op), String> {
    if let Some((k, v)) = t.split_once("!=") {
        return Ok((k.trim().into(), Op::Ne(v.trim().into())));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok((k.trim().into(), Op::Eq(v.trim().into())));
    }
    if label && t.contains(' ') {
        return Err(format!(
            "set-based selector {t:?} is not supported by the fake"
        ));
    }
    match (label, t.strip_prefix('!')) {
        (true, Some(k)) => Ok((k.into(), Op::NotExists)),
        (true, None) => Ok((t.into(), Op::Exists)),
        (false, _) => Err(format!("invalid field selector {t:?}")),
    }
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    let m = &obj["metadata"];
    let name = m["name"].as_str().expect("metadata.name").to_string();
    let ns = match kind {
        Kind::Namespace => String::new(),
        _ => m["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_string(),
    };
    (kind, ns, name)
}

fn set_map_entry(map: &mut Value, key: &str, value: Option<&str>) {
    if !map.is_object() {
        *map = json!({});
    }
    let m = map.as_object_mut().unwrap();
    match value {
        Some(v) => {
            m.insert(key.into(), json!(v));
        }
        None => {
            m.remove(key);
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(c) => {
                    out.push(c);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// 2024-01-01T00:00:00Z plus `n` seconds (n < one day in tests).
fn timestamp(n: u64) -> String {
    let n = n % 86_400;
    format!(
        "2024-01-01T{:02}:{:02}:{:02}Z",
        n / 3600,
        (n / 60) % 60,
        n % 60
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    Bytes::from(b)
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn error(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    error(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural()),
    )
}

fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response<Body> {
    let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(body))
        .unwrap()
}

/// A namespace object.
pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1",
           "metadata": {"name": name, "labels": labels},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// A running pod on `node` with one IP; `extra` is merged into it (RFC 7386).
pub fn pod(namespace: &str, name: &str, node: &str, ip: &str, extra: Value) -> Value {
    let mut p = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "hostIP": "192.0.2.1", "hostIPs": [{"ip": "192.0.2.1"}]},
    });
    merge_patch(&mut p, &extra);
    p
}

/// A ClusterIP service; `ports` are `(name, port, targetPort)`, a targetPort a number or a
/// container port name.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, Value)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, t)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": t}))
        .collect();
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"], "ports": ports, "selector": {"app": name}},
    })
}

/// An IPv4 EndpointSlice of `service`; `ports` are `(service port name, number)`, `endpoints`
/// `(ip, ready, pod name)` (the pod in the slice's namespace).
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(&str, bool, Option<&str>)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready, pod)| {
            let mut e = json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
            });
            if let Some(p) = pod {
                e["targetRef"] = json!({"kind": "Pod", "namespace": namespace, "name": p});
            }
            e
        })
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}
