//! Transparent mode with real TPROXY in network namespaces (root only; skipped otherwise):
//! runs `tests/transparent.sh` against the built binary, in IPv4 and in IPv6 (`ip6` TPROXY
//! to `[::1]`, IPV6_TRANSPARENT listeners and upstream sockets, ztunnel's default `[::]`
//! listeners).

use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_script(family: &str) {
    if unsafe { libc::geteuid() } != 0 || !have("nft") || !have("ip") || !have("python3") {
        eprintln!("skipped: needs root, nft, ip and python3");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/transparent.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ztunnel"))
        .arg(family)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("transparent (IPv{family}): all checks passed")),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn tproxy_hbone_passthrough_plaintext_and_policy_in_netns() {
    run_script("4");
}

#[test]
fn tproxy_over_ipv6_hbone_passthrough_plaintext_and_policy_in_netns() {
    run_script("6");
}
