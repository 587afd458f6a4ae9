//! The HTTP/1.1 side ports: admin (15000, localhost: `/config_dump`), metrics (15020:
//! `/metrics`) and readiness (15021: `/healthz/ready`). The server is shared by every proxy of
//! the system: ztunnel and the waypoint each say what they show through [`AdminSource`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::identity::SecretManager;
use crate::metrics::Metrics;
use crate::proxy::pool::Pool;
use crate::state::StateHandle;

/// What a proxy's side ports show.
pub trait AdminSource: Send + Sync + 'static {
    /// `/healthz/ready` answers 200 when true.
    fn is_ready(&self) -> bool;
    /// The `/config_dump` document.
    fn config_dump(&self) -> serde_json::Value;
    /// The `/metrics` text (OpenMetrics).
    fn metrics(&self) -> String;
    /// A `/debug/...` query on the admin port: None for an unknown path (404), an error for a
    /// bad query (400).
    fn debug(
        &self,
        _path: &str,
        _query: Option<&str>,
    ) -> Option<Result<serde_json::Value, String>> {
        None
    }
}

/// What ztunnel's side ports show.
pub struct AdminInputs {
    pub cfg: Arc<Config>,
    pub state: StateHandle,
    pub manager: Arc<SecretManager>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub draining: CancellationToken,
}

impl AdminSource for AdminInputs {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.is_cancelled()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn debug(&self, path: &str, query: Option<&str>) -> Option<Result<serde_json::Value, String>> {
        match path {
            "/debug/route" => Some(
                crate::explain::parse_query(query)
                    .map(|(src, dst)| crate::explain::explain(&self.state.get(), src, dst)),
            ),
            "/debug/inbound" => Some(
                crate::explain::parse_inbound_query(query)
                    .map(|c| crate::explain::explain_inbound(&self.state.get(), c)),
            ),
            _ => None,
        }
    }

    /// The whole `/config_dump` document.
    fn config_dump(&self) -> serde_json::Value {
        let st = self.state.get();
        serde_json::json!({
            "node": st.node,
            "trustDomain": st.trust_domain,
            "config": *self.cfg,
            "configFile": self.state.status(),
            "workloads": st.workloads,
            "services": st.services,
            "policies": st.policies,
            "certificates": self.manager.dump(),
            "pool": self.pool.dump(),
            "ready": self.is_ready(),
        })
    }
}

/// Which port a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Admin,
    Metrics,
    Readiness,
}

fn text(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

fn ready(a: &dyn AdminSource) -> Response<Full<Bytes>> {
    if a.is_ready() {
        text(StatusCode::OK, "text/plain", "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
    }
}

/// One request on `port`: `/config_dump` (and the index) only on the admin port, which listens
/// on localhost by default; metrics on the admin and metrics ports; readiness on every port.
pub fn handle<B>(a: &dyn AdminSource, port: Port, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (port, path) {
        (_, "/healthz/ready") => ready(a),
        (Port::Admin, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&a.config_dump()).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        (Port::Admin, "/") => text(
            StatusCode::OK,
            "text/plain",
            "/config_dump  the running configuration, certificates (no keys), pool\n\
             /debug/route?src=<ip>&dst=<ip:port>  the decision for one outbound connection (ztunnel, \
             the waypoint: &method=&path=&header=name:value too)\n\
             /debug/inbound?src=<ip>&dst=<ip:port>[&authority=<ip:port>]  (ztunnel) the \
             decision for one connection arriving at this node (15008 HBONE, 15006 plaintext)\n\
             /metrics\n\
             /healthz/ready\n",
        ),
        (Port::Admin, p) if p.starts_with("/debug/") => match a.debug(p, req.uri().query()) {
            Some(Ok(v)) => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            ),
            Some(Err(e)) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            None => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        },
        (Port::Metrics | Port::Admin, "/metrics" | "/stats/prometheus") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            a.metrics(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the three side ports (admin, metrics, readiness: bound listeners, in that order) on
/// the `side` runtime until `stop`.
pub fn spawn_side_ports<A: AdminSource>(
    side: &tokio::runtime::Handle,
    a: Arc<A>,
    listeners: [std::net::TcpListener; 3],
    stop: CancellationToken,
) {
    let [admin, metrics, readiness] = listeners;
    for (l, port) in [
        (admin, Port::Admin),
        (metrics, Port::Metrics),
        (readiness, Port::Readiness),
    ] {
        let (a, stop) = (a.clone(), stop.clone());
        side.spawn(async move {
            match crate::socket::to_tokio(l) {
                Ok(l) => serve(a, port, l, stop).await,
                Err(e) => tracing::error!(error = %e, "side port"),
            }
        });
    }
}

/// Serves HTTP/1.1 on `listener` until `stop`.
pub async fn serve<A: AdminSource>(
    a: Arc<A>,
    port: Port,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let a = a.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(a.as_ref(), port, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Fake;

    impl AdminSource for Fake {
        fn is_ready(&self) -> bool {
            true
        }
        fn config_dump(&self) -> serde_json::Value {
            serde_json::json!({"secret": "config"})
        }
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
    }

    fn get(port: Port, path: &str) -> (StatusCode, String) {
        let req = Request::get(path).body(()).unwrap();
        let resp = handle(&Fake, port, &req);
        let status = resp.status();
        let bytes = futures::executor::block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn config_dump_is_served_on_the_admin_port_only() {
        let (status, body) = get(Port::Admin, "/config_dump");
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("secret"), "{body}");
        for port in [Port::Metrics, Port::Readiness] {
            for path in ["/config_dump", "/"] {
                let (status, body) = get(port, path);
                assert_eq!(status, StatusCode::NOT_FOUND, "{port:?} {path}");
                assert!(!body.contains("secret"), "{port:?} {path}: {body}");
            }
        }
    }

    #[test]
    fn debug_queries_are_admin_only() {
        assert_eq!(
            get(Port::Admin, "/debug/route").0,
            StatusCode::NOT_FOUND,
            "Fake has none"
        );
        assert_eq!(get(Port::Metrics, "/debug/route").0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(Port::Readiness, "/debug/route").0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn metrics_and_readiness_are_where_they_belong() {
        assert_eq!(get(Port::Metrics, "/metrics").0, StatusCode::OK);
        assert_eq!(get(Port::Readiness, "/metrics").0, StatusCode::NOT_FOUND);
        for port in [Port::Admin, Port::Metrics, Port::Readiness] {
            assert_eq!(get(port, "/healthz/ready").0, StatusCode::OK, "{port:?}");
        }
    }
}
