//! The ztunnel netns's per-source SYN limit (ztunnel-init's `syn-limit` chain) drops SYNs in
//! the kernel, before they reach a listener: ztunnel never sees them. So that an operator
//! still finds them where the other refusals are, this reads the chain's counters every
//! [`POLL`] and reports what it dropped as `ztunnel_refused_connections_total{direction=
//! "captured",cause="syn-limit"}` and a WARN at most once a minute. (A kernel log line would
//! not do: a pod's netns may not log, `net.netfilter.nf_log_all_netns` is 0 by default.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::refusals::REFUSALS;

pub const POLL: Duration = Duration::from_secs(10);
const LISTENER: &str = "captured";
const CAUSE: &str = "syn-limit";

/// What the counters add since the last reading: a smaller reading (the chain was made
/// again) counts from zero.
pub fn delta(last: u64, now: u64) -> u64 {
    if now >= last {
        now - last
    } else {
        now
    }
}

/// Polls until `stop`; ends quietly where nftables cannot be read (no `nft`, the iptables
/// backend's netns: its hashlimit drops are then only in `iptables-save -c`).
pub async fn report(metrics: Arc<Metrics>, stop: CancellationToken) {
    let read = || tokio::task::spawn_blocking(ambient_net::nft::syn_limit_drops);
    let mut last = match read().await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "not reporting the SYN limit's drops: nftables unreadable");
            return;
        }
        Err(_) => return,
    };
    let mut unlogged = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let Ok(Ok(now)) = read().await else { continue };
        let d = delta(last, now);
        last = now;
        if d == 0 {
            continue;
        }
        metrics.refused_n("captured", CAUSE, d);
        unlogged += d;
        if REFUSALS.admit(LISTENER, CAUSE, Instant::now()).is_some() {
            tracing::warn!(
                listener = LISTENER,
                cause = CAUSE,
                dropped = unlogged,
                "refusing connections ({CAUSE}): {unlogged} SYNs from sources over their rate of \
                 new connections dropped in this netns (ztunnel-init \
                 --new-connections-per-source); logged at most once a minute"
            );
            unlogged = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remade_chain_counts_from_zero() {
        assert_eq!(delta(10, 25), 15);
        assert_eq!(delta(25, 25), 0);
        assert_eq!(delta(25, 4), 4);
    }
}
