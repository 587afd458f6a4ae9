//! Transparent mode with real TPROXY in network namespaces (root only; skipped otherwise):
//! runs `tests/transparent.sh` against the built binary.

use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn tproxy_hbone_passthrough_plaintext_and_policy_in_netns() {
    if unsafe { libc::geteuid() } != 0 || !have("nft") || !have("ip") || !have("python3") {
        eprintln!("skipped: needs root, nft, ip and python3");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/transparent.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ztunnel"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("transparent: all checks passed"),
        "{stdout}\n{stderr}"
    );
}
