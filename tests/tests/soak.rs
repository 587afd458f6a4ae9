//! The soak's short form (issue 13, "Load"): 500 connections through the mesh for 20 s,
//! opened, held, echoing and churned, on a lab of its own; both ztunnels' descriptors and RSS
//! flat after the warm-up, nothing failed or refused, everything released at the end. The
//! full run is `ambient-lab soak --connections 10000 --duration 600`. Needs root.

use std::sync::mpsc;
use std::time::Duration;

use ambient_lab::soak::{soak, SoakArgs};
use ambient_lab::unique_prefix;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

#[test]
fn five_hundred_connections_for_twenty_seconds_stay_flat_and_nothing_fails() {
    let mut args = SoakArgs::new(500, 20);
    args.prefix = unique_prefix("sk");
    args.interval = 2;
    args.warmup = Some(6);
    args.echo_every = 2;
    args.churn = Some(10.0);
    // The soak stops itself at --duration; this bounds the lab's set-up and tear-down too.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(soak(LAB.as_ref(), &args));
    });
    let report = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("the soak did not end within 3 minutes")
        .expect("soak");
    eprintln!("{}", report.table());
    assert_eq!(report.clients.len(), 3, "{:?}", report.clients);
    assert!(
        report.samples.len() >= 8,
        "{} samples",
        report.samples.len()
    );
    assert!(
        report.churned >= 100,
        "only {} connections churned",
        report.churned
    );
    // 500 connections echoing every 2 s for ~20 s.
    assert!(report.echoes >= 3000, "only {} echoes", report.echoes);
    assert_eq!(
        (
            report.connect_failures,
            report.resets,
            report.timeouts,
            report.wrong
        ),
        (0, 0, 0, 0),
        "first errors: {:?}",
        report.first_errors
    );
    assert_eq!((report.ztunnel_refused, report.ztunnel_failed), (0, 0));
    // Each ztunnel holds a descriptor per connection while they are open.
    for s in &report.samples {
        assert!(s.a.fds >= 500 && s.b.fds >= 500, "{s:?}");
    }
    assert!(report.flat, "not flat: {:?}", report.spread);
    assert!(report.released, "not released: {:?}", report.after);
    assert!(report.pass);
}
