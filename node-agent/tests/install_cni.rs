//! `ambient-agent install-cni` end to end, on temporary CNI dirs filled with real-world config
//! files (tests/fixtures/cni): chaining into each, idempotence (no rewrite at all the second
//! time), byte-for-byte uninstall, broken files, and the inotify repair loop (within 1 s).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_ambient-agent");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cni");
const DEFAULT_SOCKET: &str = "/var/run/ambient/agent.sock";

fn fixture(name: &str) -> Vec<u8> {
    fs::read(Path::new(FIXTURES).join(name)).unwrap()
}

/// A CNI bin dir and config dir in a tempdir, and a stand-in plugin binary.
struct Node {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    plugin: PathBuf,
}

impl Node {
    fn with(fixtures: &[&str]) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("net.d");
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&bin).unwrap();
        let plugin = tmp.path().join("ambient-cni.build");
        fs::write(&plugin, b"#!/bin/sh\necho stand-in for ambient-cni\n").unwrap();
        for f in fixtures {
            fs::write(conf.join(f), fixture(f)).unwrap();
        }
        Node {
            _tmp: tmp,
            conf,
            bin,
            plugin,
        }
    }

    fn cmd(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(AGENT);
        c.arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .arg("--cni-conf-dir")
            .arg(&self.conf)
            .arg("--plugin-bin")
            .arg(&self.plugin)
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        c
    }

    fn run(&self, extra: &[&str]) -> Output {
        self.cmd(extra).output().unwrap()
    }

    fn install(&self) -> Output {
        let out = self.run(&[]);
        assert!(out.status.success(), "install failed: {}", stderr(&out));
        out
    }

    fn uninstall(&self) {
        let out = self.run(&["--uninstall"]);
        assert!(out.status.success(), "uninstall failed: {}", stderr(&out));
        assert!(!self.bin.join("ambient-cni").exists(), "binary left behind");
    }

    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.conf.join(name)).unwrap()
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_slice(&self.read(name))
            .unwrap_or_else(|e| panic!("{name} is not valid JSON after install: {e}"))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Every file of both dirs: content, inode and mtime (a rename or a write changes them).
    fn snapshot(&self) -> BTreeMap<PathBuf, (Vec<u8>, u64, i64, i64)> {
        let mut m = BTreeMap::new();
        for d in [&self.conf, &self.bin] {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::metadata(&p).unwrap();
                let data = if md.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    vec![]
                };
                m.insert(p, (data, md.ino(), md.mtime(), md.mtime_nsec()));
            }
        }
        m
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The plugins of a list, our entry checked to be the last one and returned apart.
fn split_ours(v: &Value) -> (Vec<Value>, Value) {
    let mut plugins = v["plugins"].as_array().expect("plugins list").clone();
    let ours = plugins.pop().expect("a plugin");
    assert_eq!(ours["type"], "ambient-cni", "our entry is not last: {v:#}");
    assert!(
        plugins.iter().all(|p| p["type"] != "ambient-cni"),
        "a second ambient-cni entry: {v:#}"
    );
    (plugins, ours)
}

/// `after` is `before` with exactly one run of bytes inserted (nothing else touched); returns
/// the inserted bytes.
fn single_insertion(before: &[u8], after: &[u8]) -> String {
    assert!(after.len() > before.len());
    let p = before.iter().zip(after).take_while(|(a, b)| a == b).count();
    let s = before[p..]
        .iter()
        .rev()
        .zip(after.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(
        p + s,
        before.len(),
        "more than one region changed:\n--- before\n{}\n--- after\n{}",
        String::from_utf8_lossy(before),
        String::from_utf8_lossy(after)
    );
    String::from_utf8(after[p..after.len() - s].to_vec()).unwrap()
}

/// Install into a `.conflist` fixture and check everything the installer promises about it.
fn check_conflist(name: &str) {
    let node = Node::with(&[name]);
    let before = node.read(name);
    node.install();
    assert_eq!(node.names(), [name], "only the primary is there");

    // Valid JSON, our entry last with the default options, every other plugin and field as was.
    let after = node.read(name);
    let orig: Value = serde_json::from_slice(&before).unwrap();
    let v = node.json(name);
    let (others, ours) = split_ours(&v);
    assert_eq!(&others, orig["plugins"].as_array().unwrap());
    assert_eq!(
        ours,
        serde_json::json!({"type": "ambient-cni", "agentSocket": DEFAULT_SOCKET})
    );
    for (k, val) in orig.as_object().unwrap() {
        if k != "plugins" {
            assert_eq!(&v[k], val, "top-level {k} changed");
        }
    }
    // Byte-level: the only change is our entry (with its separator) spliced in, so key order,
    // formatting, number spelling and unknown fields all survive.
    let inserted = single_insertion(&before, &after);
    let entry = inserted.trim_start_matches([',', ' ', '\t', '\r', '\n']);
    assert_eq!(serde_json::from_str::<Value>(entry).unwrap(), ours);
    let entry_at = String::from_utf8_lossy(&after).find(entry).unwrap();
    let last_bracket = String::from_utf8_lossy(&after).rfind(']').unwrap();
    assert!(entry_at < last_bracket);
    assert_eq!(node.read(name).len(), after.len());
    assert!(node.bin.join("ambient-cni").exists());
    assert_eq!(
        fs::metadata(node.bin.join("ambient-cni"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );

    // Twice: nothing is written at all (same bytes, inode, mtime), binary included.
    let snap = node.snapshot();
    node.install();
    assert_eq!(node.snapshot(), snap, "second install rewrote something");

    // Uninstall: the original bytes, no leftovers.
    node.uninstall();
    assert_eq!(node.read(name), before, "uninstall did not restore {name}");
    assert_eq!(node.names(), [name]);
}

/// Install into a single-plugin fixture: it becomes `<base>.conflist`, and comes back on
/// uninstall byte for byte.
fn check_single(name: &str) {
    let node = Node::with(&[name]);
    let before = node.read(name);
    let orig: Value = serde_json::from_slice(&before).unwrap();
    node.install();
    let stem = name.rsplit_once('.').unwrap().0;
    let list = format!("{stem}.conflist");
    assert_eq!(
        node.names(),
        std::slice::from_ref(&list),
        "the .conf is replaced by a list"
    );

    let v = node.json(&list);
    assert_eq!(v["name"], orig["name"]);
    assert_eq!(v["cniVersion"], orig["cniVersion"]);
    let (others, ours) = split_ours(&v);
    assert_eq!(
        others,
        std::slice::from_ref(&orig),
        "the original is the first plugin"
    );
    assert_eq!(ours["agentSocket"], DEFAULT_SOCKET);
    assert_eq!(ours["_ambientConvertedFrom"]["file"], name);
    let text = String::from_utf8(node.read(&list)).unwrap();
    let (c, n, p) = (
        text.find("\"cniVersion\"").unwrap(),
        text.find("\"name\"").unwrap(),
        text.find("\"plugins\"").unwrap(),
    );
    assert!(c < n && n < p, "list keys out of order:\n{text}");

    let snap = node.snapshot();
    node.install();
    assert_eq!(node.snapshot(), snap, "second install rewrote something");

    node.uninstall();
    assert_eq!(node.names(), [name]);
    assert_eq!(node.read(name), before, "uninstall did not restore {name}");
}

#[test]
fn calico() {
    check_conflist("10-calico.conflist");
}

#[test]
fn cilium_chaining() {
    check_conflist("05-cilium.conflist");
}

#[test]
fn flannel_conflist() {
    check_conflist("10-flannel.conflist");
}

#[test]
fn kindnet_tabs() {
    check_conflist("10-kindnet.conflist");
}

#[test]
fn aws_vpc_cni_one_line() {
    check_conflist("10-aws.conflist");
}

#[test]
fn bridge_spec_example() {
    check_conflist("10-bridge.conflist");
}

#[test]
fn flannel_old_conf() {
    check_single("10-flannel.conf");
}

#[test]
fn ptp_single_plugin_conf() {
    check_single("10-ptp.conf");
}

#[test]
fn single_plugin_json_with_escapes() {
    check_single("20-macvlan.json");
}

#[test]
fn first_file_in_lexical_order_wins_and_others_are_untouched() {
    let node = Node::with(&[
        "10-calico.conflist",
        "05-cilium.conflist",
        "10-kindnet.conflist",
    ]);
    // Not config files for libcni: another extension, a directory.
    fs::write(node.conf.join("00-notes.txt"), "x").unwrap();
    fs::write(node.conf.join("00-old.conflist.bak"), "{").unwrap();
    fs::create_dir(node.conf.join("00-dir.conflist")).unwrap();
    node.install();
    split_ours(&node.json("05-cilium.conflist"));
    assert_eq!(
        node.read("10-calico.conflist"),
        fixture("10-calico.conflist")
    );
    assert_eq!(
        node.read("10-kindnet.conflist"),
        fixture("10-kindnet.conflist")
    );
    assert_eq!(
        fs::read(node.conf.join("00-old.conflist.bak")).unwrap(),
        b"{"
    );
    node.uninstall();
    assert_eq!(
        node.read("05-cilium.conflist"),
        fixture("05-cilium.conflist")
    );
}

#[test]
fn broken_and_empty_files_fail_naming_the_file_and_write_nothing() {
    for bad in [
        &["00-empty.conflist"][..],
        &["01-truncated.conflist"],
        &["02-no-plugins.conflist"],
        &["03-list-in-a.conf"],
        &[
            "00-empty.conflist",
            "01-truncated.conflist",
            "03-list-in-a.conf",
        ],
    ] {
        let node = Node::with(bad);
        let snap = node.snapshot();
        let out = node.run(&[]);
        assert!(!out.status.success(), "{bad:?}: install should fail");
        let err = stderr(&out);
        for f in bad {
            assert!(err.contains(f), "{bad:?}: error does not name {f}: {err}");
        }
        assert!(err.contains("nothing written"), "{err}");
        assert_eq!(node.snapshot(), snap, "{bad:?}: something was written");
    }
    let node = Node::with(&["00-empty.conflist"]);
    assert!(stderr(&node.run(&[])).contains("empty"));
    let node = Node::with(&["01-truncated.conflist"]);
    assert!(stderr(&node.run(&[])).contains("not valid JSON"));
    let node = Node::with(&["02-no-plugins.conflist"]);
    assert!(stderr(&node.run(&[])).contains("no plugins"));
}

#[test]
fn broken_file_sorting_first_is_skipped_like_kubelet_with_a_warning() {
    let node = Node::with(&[
        "01-truncated.conflist",
        "00-empty.conflist",
        "10-calico.conflist",
    ]);
    let out = node.install();
    let err = stderr(&out);
    assert!(err.contains("01-truncated.conflist") && err.contains("00-empty.conflist"));
    assert!(err.contains("chained into 10-calico.conflist"), "{err}");
    split_ours(&node.json("10-calico.conflist"));
    assert_eq!(node.read("00-empty.conflist"), b"");
    assert_eq!(
        node.read("01-truncated.conflist"),
        fixture("01-truncated.conflist")
    );
}

#[test]
fn plugin_config_order_kept_and_replaced_in_place() {
    let node = Node::with(&["10-calico.conflist"]);
    let cfg = r#"{"agentSocket":"/run/a.sock","failOpen":true,"excludedNamespaces":["kube-system","istio-system"]}"#;
    let out = node.run(&["--plugin-config", cfg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(node.read("10-calico.conflist")).unwrap();
    let at = |k: &str| text.rfind(&format!("\"{k}\"")).unwrap();
    assert!(at("type") < at("agentSocket"));
    assert!(at("agentSocket") < at("failOpen") && at("failOpen") < at("excludedNamespaces"));
    let (_, ours) = split_ours(&node.json("10-calico.conflist"));
    assert_eq!(ours["failOpen"], true);

    // New options: the entry is replaced where it is, nothing else moves.
    let out = node.run(&[
        "--plugin-config",
        r#"{"type":"ambient-cni","agentSocket":"/run/b.sock"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (others, ours) = split_ours(&node.json("10-calico.conflist"));
    assert_eq!(
        ours,
        serde_json::json!({"type":"ambient-cni","agentSocket":"/run/b.sock"})
    );
    assert_eq!(others.len(), 3);
    single_insertion(
        &fixture("10-calico.conflist"),
        &node.read("10-calico.conflist"),
    );

    // Bad configs are refused before anything is written.
    let snap = node.snapshot();
    for bad in [
        r#"{"type":"calico"}"#,
        "[]",
        "{",
        r#"{"_ambientConvertedFrom":{}}"#,
    ] {
        let out = node.run(&["--plugin-config", bad]);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(stderr(&out).contains("--plugin-config"));
    }
    assert_eq!(node.snapshot(), snap);
    node.uninstall();
    assert_eq!(
        node.read("10-calico.conflist"),
        fixture("10-calico.conflist")
    );
}

#[test]
fn mode_kept_and_missing_plugin_binary_refused() {
    let node = Node::with(&["10-kindnet.conflist"]);
    let p = node.conf.join("10-kindnet.conflist");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    node.install();
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let node = Node::with(&["10-kindnet.conflist"]);
    fs::remove_file(&node.plugin).unwrap();
    let snap = node.snapshot();
    let out = node.run(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("plugin binary"), "{}", stderr(&out));
    assert_eq!(node.snapshot(), snap);
}

#[test]
fn conversion_target_owned_by_someone_else_is_refused() {
    let node = Node::with(&["10-flannel.conf"]);
    // A list of the same base name that we did not make sorts after the .conf.
    fs::write(
        node.conf.join("10-flannel.conflist"),
        fixture("10-flannel.conflist"),
    )
    .unwrap();
    let snap = node.snapshot();
    let out = node.run(&[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not made by this installer"),
        "{}",
        stderr(&out)
    );
    let mut after = node.snapshot();
    after.retain(|p, _| p.starts_with(&node.conf));
    let mut before = snap;
    before.retain(|p, _| p.starts_with(&node.conf));
    assert_eq!(after, before);
}

#[test]
fn uninstall_keeps_a_list_edited_since_conversion() {
    let node = Node::with(&["10-ptp.conf"]);
    node.install();
    // Someone appends another plugin to our converted list.
    let mut v = node.json("10-ptp.conflist");
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bandwidth"}));
    fs::write(
        node.conf.join("10-ptp.conflist"),
        serde_json::to_string_pretty(&v).unwrap(),
    )
    .unwrap();
    node.uninstall();
    // Their change is kept: still a list, without our entry.
    assert_eq!(node.names(), ["10-ptp.conflist"]);
    let v = node.json("10-ptp.conflist");
    let types: Vec<_> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["ptp", "bandwidth"]);
}

// ---- waiting and --watch ------------------------------------------------------------------

/// A running `install-cni`, killed on drop; its stderr collected for assertions and failures.
struct Running {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn start(node: &Node, extra: &[&str]) -> Running {
        let mut child = node
            .cmd(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, needle: &str) {
        let t = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no {needle:?} in log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ok` until it holds; returns how long that took (panics after 10 s).
fn until(what: &str, r: &Running, ok: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}; log:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

fn has_our_entry_last(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().and_then(|p| p.last().cloned()))
        .is_some_and(|p| p["type"] == "ambient-cni")
}

/// Writes like a CNI installer does: temp file, then rename over the target.
fn replace(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp-upgrade");
    fs::write(&tmp, data).unwrap();
    fs::rename(&tmp, path).unwrap();
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn one_shot_waits_for_the_first_config() {
    let node = Node::with(&[]);
    let r = Running::start(&node, &[]);
    r.wait_log("waiting for the primary CNI's network config");
    assert!(
        !node.bin.join("ambient-cni").exists(),
        "binary before any config"
    );
    let primary = node.conf.join("10-calico.conflist");
    replace(&primary, &fixture("10-calico.conflist"));
    let took = until("the entry", &r, || has_our_entry_last(&primary));
    assert!(took < SECOND, "took {took:?}");
    let mut r = r;
    let t = Instant::now();
    let st = loop {
        if let Some(st) = r.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "one-shot did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success());
}

#[test]
fn watch_repairs_a_rewritten_primary_within_a_second() {
    let node = Node::with(&["10-calico.conflist"]);
    let primary = node.conf.join("10-calico.conflist");
    let r = Running::start(&node, &["--watch"]);
    until("the first install", &r, || has_our_entry_last(&primary));

    // A CNI upgrade rewrites its config (rename over it) without our entry.
    replace(&primary, &fixture("10-calico.conflist"));
    let took = until("the repair", &r, || has_our_entry_last(&primary));
    assert!(took < SECOND, "repair took {took:?}");

    // And an in-place rewrite (truncate + write).
    fs::write(&primary, fixture("10-calico.conflist")).unwrap();
    let took = until("the repair", &r, || has_our_entry_last(&primary));
    assert!(took < SECOND, "repair took {took:?}");

    // The binary is put back too.
    fs::remove_file(node.bin.join("ambient-cni")).unwrap();
    let took = until("the binary", &r, || node.bin.join("ambient-cni").exists());
    assert!(took < SECOND, "binary repair took {took:?}");

    // Settled: nothing is rewritten while nothing changes.
    std::thread::sleep(Duration::from_millis(400));
    let snap = node.snapshot();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(node.snapshot(), snap);
    assert!(r.terminate().success());
    // Without --uninstall-on-exit the chain stays.
    assert!(has_our_entry_last(&primary));
}

#[test]
fn watch_rechains_into_a_new_first_file_within_a_second() {
    let node = Node::with(&["10-calico.conflist"]);
    let old = node.conf.join("10-calico.conflist");
    let r = Running::start(&node, &["--watch"]);
    until("the first install", &r, || has_our_entry_last(&old));

    let new = node.conf.join("00-new.conflist");
    replace(&new, &fixture("10-kindnet.conflist"));
    let took = until("the re-chain", &r, || {
        has_our_entry_last(&new) && fs::read(&old).unwrap() == fixture("10-calico.conflist")
    });
    assert!(took < SECOND, "re-chain took {took:?}");
    split_ours(&node.json("00-new.conflist"));

    // The new file goes away again: back into calico.
    fs::remove_file(&new).unwrap();
    let took = until("the re-chain back", &r, || has_our_entry_last(&old));
    assert!(took < SECOND, "re-chain took {took:?}");
}

#[test]
fn watch_rechain_restores_a_converted_conf() {
    let node = Node::with(&["10-flannel.conf"]);
    let list = node.conf.join("10-flannel.conflist");
    let r = Running::start(&node, &["--watch"]);
    until("the conversion", &r, || has_our_entry_last(&list));

    let new = node.conf.join("00-new.conflist");
    replace(&new, &fixture("10-bridge.conflist"));
    let took = until("the re-chain", &r, || {
        has_our_entry_last(&new)
            && !list.exists()
            && fs::read(node.conf.join("10-flannel.conf")).ok() == Some(fixture("10-flannel.conf"))
    });
    assert!(took < SECOND, "re-chain took {took:?}");
}

#[test]
fn watch_waits_then_uninstalls_on_sigterm() {
    let node = Node::with(&[]);
    let r = Running::start(&node, &["--watch", "--uninstall-on-exit"]);
    r.wait_log("waiting for the primary CNI's network config");
    // A broken file first: logged, nothing written, still waiting.
    fs::write(node.conf.join("10-flannel.conf"), b"{\"name\":").unwrap();
    r.wait_log("waiting for a usable CNI network config");
    assert!(r.log().contains("10-flannel.conf"));
    assert!(!node.bin.join("ambient-cni").exists());
    // The primary CNI finishes writing it.
    replace(
        &node.conf.join("10-flannel.conf"),
        &fixture("10-flannel.conf"),
    );
    let list = node.conf.join("10-flannel.conflist");
    let took = until("the conversion", &r, || has_our_entry_last(&list));
    assert!(took < SECOND, "took {took:?}");
    until("the .conf to go", &r, || {
        !node.conf.join("10-flannel.conf").exists()
    });

    // The DaemonSet goes away: SIGTERM undoes everything.
    assert!(r.terminate().success());
    assert_eq!(node.names(), ["10-flannel.conf"]);
    assert_eq!(node.read("10-flannel.conf"), fixture("10-flannel.conf"));
    assert!(!node.bin.join("ambient-cni").exists());
}

// ---- through real libcni ------------------------------------------------------------------
//
// The lab's libcni client (tests/cniclient, built from Debian's libcni) loads what the installer
// wrote exactly as a runtime would (`LoadConfList` by network name, a .conf through
// `ConfListFromConf`). These need `go` and Debian's CNI plugins (.ci/run installs both) and the
// workspace's ambient-cni binary (test.sh builds it); without them they are skipped, except in
// CI, where that is a failure.

fn available(what: &str, ok: bool) -> bool {
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is missing (it is installed by .ci/run / built by test.sh)"
        );
        eprintln!("skipped: {what} is missing");
    }
    ok
}

/// Builds the lab's libcni client once per test binary run, into target/install-cni-test/.
fn cniclient() -> Option<PathBuf> {
    static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let has_go = Command::new("go").arg("version").output().is_ok();
            if !available("go (golang-go)", has_go) {
                return None;
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let out = target.join("install-cni-test");
            fs::create_dir_all(&out).unwrap();
            // Built fresh each run (Go's cache makes that quick), renamed into place so that
            // concurrent runs never see half a binary.
            let bin = out.join("cniclient");
            let tmp = out.join(format!("cniclient.tmp.{}", std::process::id()));
            let st = Command::new("go")
                .args(["build", "-o"])
                .arg(&tmp)
                .arg(".")
                .current_dir(root.join("tests/cniclient"))
                .env("GOPATH", "/usr/share/gocode")
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .env("CGO_ENABLED", "0")
                .env("GOCACHE", out.join("gocache"))
                .status()
                .unwrap();
            assert!(st.success(), "go build of tests/cniclient failed");
            fs::rename(&tmp, &bin).unwrap();
            Some(bin)
        })
        .clone()
}

/// `cniclient status <dir> <name>`: libcni loads the list (plugins are only called for
/// cniVersion >= 1.1.0, which none of the fixtures is).
fn libcni_loads(client: &Path, dir: &Path, name: &str) -> Result<(), String> {
    let out = Command::new(client)
        .arg("status")
        .arg(dir)
        .arg(name)
        .env("CNI_PATH", "/nonexistent")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(stderr(&out))
    }
}

#[test]
fn real_libcni_loads_every_installed_chain() {
    let Some(client) = cniclient() else { return };
    for f in [
        "10-calico.conflist",
        "05-cilium.conflist",
        "10-flannel.conflist",
        "10-kindnet.conflist",
        "10-aws.conflist",
        "10-bridge.conflist",
        "10-flannel.conf",
        "10-ptp.conf",
        "20-macvlan.json",
    ] {
        let node = Node::with(&[f]);
        let net: Value = serde_json::from_slice(&fixture(f)).unwrap();
        let net = net["name"].as_str().unwrap().to_string();
        libcni_loads(&client, &node.conf, &net).unwrap_or_else(|e| panic!("{f} as is: {e}"));
        node.install();
        libcni_loads(&client, &node.conf, &net)
            .unwrap_or_else(|e| panic!("{f} with our entry: {e}"));
        node.uninstall();
        libcni_loads(&client, &node.conf, &net)
            .unwrap_or_else(|e| panic!("{f} after uninstall: {e}"));
    }
}

/// Network namespaces made for one test, deleted on drop.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn real_libcni_runs_ptp_then_ambient_cni_from_a_converted_conf() {
    let Some(client) = cniclient() else { return };
    let plugin = Path::new(AGENT).with_file_name("ambient-cni");
    let root = nix::unistd::geteuid().is_root();
    if !available("root", root)
        || !available("/usr/lib/cni/ptp", Path::new("/usr/lib/cni/ptp").exists())
        || !available(
            "the ambient-cni binary (cargo build --workspace)",
            plugin.exists(),
        )
    {
        return;
    }
    let node = Node::with(&[]);
    let tmp = node.conf.parent().unwrap().to_path_buf();
    let conf = format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "labnet",
  "type": "ptp",
  "ipMasq": false,
  "ipam": {{ "type": "host-local", "subnet": "10.251.7.0/24", "dataDir": "{}" }}
}}
"#,
        tmp.join("ipam").display()
    );
    fs::write(node.conf.join("10-lab.conf"), &conf).unwrap();
    let log = tmp.join("cni.log");
    let cfg = format!(
        r#"{{"agentSocket":"{}","failOpen":true,"logFile":"{}"}}"#,
        tmp.join("no-agent.sock").display(),
        log.display()
    );
    fs::copy(&plugin, &node.plugin).unwrap();
    let out = node.run(&["--plugin-config", &cfg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node.names(), ["10-lab.conflist"]);

    let id = std::process::id();
    let (host, pod) = (format!("icni{id}h"), format!("icni{id}p"));
    let _ns = Netns(vec![host.clone(), pod.clone()]);
    for n in [&host, &pod] {
        assert!(Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap()
            .success());
    }
    let cni = |cmd: &str| {
        Command::new("ip")
            .args(["netns", "exec", &host])
            .arg(&client)
            .arg(cmd)
            .arg(&node.conf)
            .arg("labnet")
            .arg(format!("/run/netns/{pod}"))
            .arg("c1")
            .env("CNI_PATH", format!("{}:/usr/lib/cni", node.bin.display()))
            .env("CNI_CACHE_DIR", tmp.join("cache"))
            .env(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=p1;IgnoreUnknown=1",
            )
            .output()
            .unwrap()
    };
    let add = cni("add");
    assert!(add.status.success(), "ADD: {}", stderr(&add));
    let result: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.251.7.2/24", "{result:#}");
    // Our plugin ran last with the entry the installer wrote (and said why it did not enrol).
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("ADD") && text.contains("failOpen"), "{text}");
    let del = cni("del");
    assert!(del.status.success(), "DEL: {}", stderr(&del));

    node.uninstall();
    assert_eq!(node.read("10-lab.conf"), conf.as_bytes());
}
