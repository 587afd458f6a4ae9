//! What the waypoint's side ports (ztunnel's admin server) show: `/config_dump` on 15000
//! (localhost), `/metrics` on 15020, `/healthz/ready` on 15021.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use ztunnel::admin::AdminSource;
use ztunnel::identity::SecretManager;
use ztunnel::metrics::Metrics;
use ztunnel::proxy::pool::Pool;

use crate::config::Config;
use crate::proxy::upstream::Upstream;
use crate::state::StateHandle;

pub struct WaypointAdmin {
    pub cfg: Arc<Config>,
    pub state: StateHandle,
    pub manager: Arc<SecretManager>,
    pub hbone: Arc<Pool>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub draining: CancellationToken,
}

impl AdminSource for WaypointAdmin {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.is_cancelled()
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({
            "config": *self.cfg,
            "configFile": self.state.status(),
            "waypoint": self.state.get().dump(),
            "certificates": self.manager.dump(),
            "pool": self.hbone.dump(),
            "upstream": self.upstream.dump(),
            "ready": self.is_ready(),
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}
