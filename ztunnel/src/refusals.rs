//! Refusals logged once per cause, not once per connection: a pod that is not enrolled, a
//! policy that denies, a client without the right certificate can each open thousands of
//! connections a second, and a WARN for each would bury everything else. The first refusal of
//! a cause on a listener is logged at once; then at most one line per cause every
//! [`EVERY`], saying how many were refused meanwhile. Every refused connection is still in the
//! access log (INFO, target `access`) and the connection metrics.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// At most one WARN per (listener, cause) this often.
pub const EVERY: Duration = Duration::from_secs(60);

/// The process's refusal log (logging only: one per process is what is wanted).
pub static REFUSALS: LazyLock<Refusals> = LazyLock::new(|| Refusals::new(EVERY));

/// When each (listener, cause) was last logged and how many were refused since.
pub struct Refusals {
    every: Duration,
    // Keys are static strings from a fixed set: the map cannot grow without bound.
    seen: Mutex<HashMap<(&'static str, &'static str), Seen>>,
}

struct Seen {
    logged: Instant,
    suppressed: u64,
}

impl Refusals {
    pub fn new(every: Duration) -> Refusals {
        Refusals {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log this refusal now: `Some(n)`, `n` the refusals of this cause not logged
    /// since its last line; `None` to count it only.
    pub fn admit(&self, listener: &'static str, cause: &'static str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&(listener, cause)) {
            None => {
                seen.insert(
                    (listener, cause),
                    Seen {
                        logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
            Some(s) if now.duration_since(s.logged) >= self.every => {
                let n = s.suppressed;
                *s = Seen {
                    logged: now,
                    suppressed: 0,
                };
                Some(n)
            }
            Some(s) => {
                s.suppressed += 1;
                None
            }
        }
    }
}

/// Logs refusal `cause` on `listener` if [`REFUSALS`] says so (WARN, with the count since the
/// cause's last line).
pub fn warn(listener: &'static str, cause: &'static str, detail: &dyn std::fmt::Display) {
    if let Some(suppressed) = REFUSALS.admit(listener, cause, Instant::now()) {
        tracing::warn!(
            listener,
            cause,
            suppressed,
            "refusing connections ({cause}): {detail}; this cause is logged at most once a \
             minute, every connection is in the access log"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_cause_then_once_per_period_with_the_count() {
        let r = Refusals::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(r.admit("outbound", "unknown-source", t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(
                r.admit("outbound", "unknown-source", t0 + Duration::from_millis(i)),
                None
            );
        }
        // Another cause, or the same cause on another listener, is its own.
        assert_eq!(r.admit("outbound", "denied", t0), Some(0));
        assert_eq!(r.admit("inbound", "unknown-source", t0), Some(0));
        assert_eq!(
            r.admit("outbound", "unknown-source", t0 + Duration::from_secs(61)),
            Some(1000)
        );
        assert_eq!(
            r.admit("outbound", "unknown-source", t0 + Duration::from_secs(62)),
            None
        );
    }
}
