//! The network configuration on stdin: the CNI fields (cniVersion, name, type, prevResult,
//! runtimeConfig, GC's attachment lists) and this plugin's own options from its conflist entry.
//!
//! Plugin options (all optional; unknown keys such as `capabilities` are ignored):
//!
//! | key | type | default |
//! |---|---|---|
//! | `agentSocket` | string | [`ambient_net::consts::DEFAULT_AGENT_SOCKET`] |
//! | `logFile` | string | [`DEFAULT_LOG_FILE`] |
//! | `logLevel` | `off`/`error`/`warn`/`info`/`debug`/`trace` | `info` |
//! | `failOpen` | bool | `false` |
//! | `excludedNamespaces` | list of strings | [`ambient_net::consts::membership::DEFAULT_EXCLUDED_NAMESPACES`] |
//! | `timeoutMs` | integer, 1..=600000 | [`DEFAULT_TIMEOUT_MS`] |

use std::path::PathBuf;
use std::time::Duration;

use ambient_net::consts::{membership::DEFAULT_EXCLUDED_NAMESPACES, DEFAULT_AGENT_SOCKET};
use ambient_net::proto::Attachment;
use serde_json::{Map, Value};
use tracing::level_filters::LevelFilter;

use crate::error::CniError;
use crate::version::CniVersion;

pub const DEFAULT_LOG_FILE: &str = "/var/log/ambient-cni.log";
pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::INFO;
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Longer than any runtime waits for a plugin; a larger value is a typo.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// The largest network configuration accepted on stdin (the agent's request limit: a GC list
/// for thousands of pods fits). Larger input is refused (code 6) before it is parsed.
pub const MAX_STDIN: usize = 4 << 20;

/// The GC attachment keys: the spec's, and the one libcni also sends (it once used it by mistake).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
pub const ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// This plugin's options from its conflist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOptions {
    pub agent_socket: PathBuf,
    pub log_file: PathBuf,
    pub log_level: LevelFilter,
    pub fail_open: bool,
    pub excluded_namespaces: Vec<String>,
    pub timeout: Duration,
}

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
            log_file: PathBuf::from(DEFAULT_LOG_FILE),
            log_level: DEFAULT_LOG_LEVEL,
            fail_open: false,
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
        }
    }
}

impl PluginOptions {
    /// Reads the options from the config object; a present option of the wrong type is code 7.
    pub fn from_object(obj: &Map<String, Value>) -> Result<Self, CniError> {
        let mut o = PluginOptions::default();
        if let Some(s) = opt_str(obj, "agentSocket")? {
            if s.is_empty() {
                return Err(CniError::invalid_config("agentSocket must not be empty"));
            }
            o.agent_socket = PathBuf::from(s);
        }
        if let Some(s) = opt_str(obj, "logFile")? {
            if s.is_empty() {
                return Err(CniError::invalid_config("logFile must not be empty"));
            }
            o.log_file = PathBuf::from(s);
        }
        if let Some(s) = opt_str(obj, "logLevel")? {
            o.log_level = parse_level(s).ok_or_else(|| {
                CniError::invalid_config(format!("invalid logLevel {s:?}"))
                    .with_details("expected one of off, error, warn, info, debug, trace")
            })?;
        }
        if let Some(v) = present(obj, "failOpen") {
            o.fail_open = v
                .as_bool()
                .ok_or_else(|| wrong_type("failOpen", "a boolean", v))?;
        }
        if let Some(v) = present(obj, "excludedNamespaces") {
            let list = v
                .as_array()
                .ok_or_else(|| wrong_type("excludedNamespaces", "a list of strings", v))?;
            o.excluded_namespaces = list
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong_type("excludedNamespaces", "a list of strings", v))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = present(obj, "timeoutMs") {
            let ms = v
                .as_u64()
                .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                .ok_or_else(|| {
                    wrong_type(
                        "timeoutMs",
                        &format!("an integer in 1..={MAX_TIMEOUT_MS}"),
                        v,
                    )
                })?;
            o.timeout = Duration::from_millis(ms);
        }
        Ok(o)
    }

    pub fn is_excluded(&self, namespace: &str) -> bool {
        !namespace.is_empty() && self.excluded_namespaces.iter().any(|n| n == namespace)
    }
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// The network configuration of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub plugin_type: String,
    /// The previous plugin's result, kept verbatim (None when absent or null).
    pub prev_result: Option<Value>,
    /// Tolerated and ignored: this plugin declares no capabilities.
    pub runtime_config: Option<Value>,
    pub options: PluginOptions,
    /// The whole object, for fields only one command reads (GC's attachment lists).
    pub raw: Map<String, Value>,
}

impl NetConf {
    /// Parses and validates stdin: not JSON / not an object → 6; a missing or mistyped
    /// cniVersion, name or type → 7; an unknown cniVersion → 1; a bad plugin option → 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw = parse_object(stdin)?;
        let cni_version = match raw.get("cniVersion") {
            Some(Value::String(s)) => s.parse::<CniVersion>()?,
            Some(v) => return Err(wrong_type("cniVersion", "a string", v)),
            None => {
                return Err(CniError::invalid_config(
                    "network configuration has no cniVersion",
                ))
            }
        };
        let name = required_str(&raw, "name")?;
        let plugin_type = required_str(&raw, "type")?;
        let prev_result = present(&raw, "prevResult").cloned();
        let runtime_config = present(&raw, "runtimeConfig").cloned();
        let options = PluginOptions::from_object(&raw)?;
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            prev_result,
            runtime_config,
            options,
            raw,
        })
    }

    /// GC's list of attachments to keep: the union of `cni.dev/valid-attachments` and
    /// `cni.dev/attachments`, de-duplicated, in order. `None` when neither key is present.
    pub fn valid_attachments(&self) -> Result<Option<Vec<Attachment>>, CniError> {
        let mut found = false;
        let mut out: Vec<Attachment> = Vec::new();
        for key in [VALID_ATTACHMENTS_KEY, ATTACHMENTS_KEY] {
            let Some(v) = present(&self.raw, key) else {
                continue;
            };
            found = true;
            let list = v.as_array().ok_or_else(|| wrong_type(key, "a list", v))?;
            for (i, item) in list.iter().enumerate() {
                let a = parse_attachment(item)
                    .map_err(|why| CniError::invalid_config(format!("{key}[{i}]: {why}")))?;
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        Ok(found.then_some(out))
    }
}

fn parse_attachment(item: &Value) -> Result<Attachment, String> {
    let obj = item
        .as_object()
        .ok_or_else(|| "expected an object with containerID and ifname".to_string())?;
    let field = |k: &str| -> Result<String, String> {
        match obj.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(format!("missing or invalid {k:?}")),
        }
    };
    Ok(Attachment {
        container_id: field("containerID")?,
        if_name: field("ifname")?,
    })
}

/// Stdin as a JSON object; anything else is a decode error (6).
pub fn parse_object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    check_size(stdin)?;
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CniError::decode(
            "network configuration on stdin must be a JSON object",
        )),
        Err(e) => Err(
            CniError::decode("failed to decode the network configuration on stdin")
                .with_details(e.to_string()),
        ),
    }
}

/// Stdin within [`MAX_STDIN`]; larger is a decode error (6).
pub fn check_size(stdin: &[u8]) -> Result<(), CniError> {
    if stdin.len() > MAX_STDIN {
        Err(CniError::decode(format!(
            "network configuration on stdin is larger than the limit of {MAX_STDIN} bytes"
        ))
        .with_details(format!("stdin: {} bytes or more", stdin.len())))
    } else {
        Ok(())
    }
}

/// The request's cniVersion if stdin is an object naming a version we speak; used to answer
/// VERSION and to write errors in the caller's version even when the rest is invalid.
pub fn peek_version(stdin: &[u8]) -> Option<CniVersion> {
    let obj = parse_object(stdin).ok()?;
    obj.get("cniVersion")?.as_str()?.parse().ok()
}

/// Where to log, read leniently from stdin before anything is validated (so that even a
/// rejected config is logged where the operator looks). Falls back to the defaults.
pub fn peek_logging(stdin: &[u8]) -> (PathBuf, LevelFilter) {
    let obj = parse_object(stdin).unwrap_or_default();
    let file = obj
        .get("logFile")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_LOG_FILE);
    let level = obj
        .get("logLevel")
        .and_then(Value::as_str)
        .and_then(parse_level)
        .unwrap_or(DEFAULT_LOG_LEVEL);
    (PathBuf::from(file), level)
}

/// A key whose value is present and not null.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(key, "a string", v)),
    }
}

fn required_str(obj: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    match opt_str(obj, key)? {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(CniError::invalid_config(format!(
            "network configuration has no {key:?}"
        ))),
    }
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> CniError {
    let mut shown = got.to_string();
    if shown.len() > 120 {
        let mut cut = 120;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    CniError::invalid_config(format!("{key} must be {expected}"))
        .with_details(format!("got {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c =
            parse(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni"})).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "k8s");
        assert_eq!(c.plugin_type, "ambient-cni");
        assert_eq!(c.prev_result, None);
        let o = c.options;
        assert_eq!(o.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(o.log_file, PathBuf::from("/var/log/ambient-cni.log"));
        assert_eq!(o.log_level, LevelFilter::INFO);
        assert!(!o.fail_open);
        assert_eq!(o.excluded_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(o.timeout, Duration::from_millis(5000));
    }

    #[test]
    fn all_options_and_unknown_keys() {
        let c = parse(json!({
            "cniVersion": "0.3.1", "name": "n", "type": "ambient-cni",
            "agentSocket": "/tmp/a.sock", "logFile": "/tmp/x.log", "logLevel": "DEBUG",
            "failOpen": true, "excludedNamespaces": ["a", "b"], "timeoutMs": 250,
            "capabilities": {"portMappings": true}, "runtimeConfig": {"portMappings": []},
            "somethingElse": [1, 2, {"x": null}], "prevResult": null
        }))
        .unwrap();
        let o = &c.options;
        assert_eq!(o.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(o.log_file, PathBuf::from("/tmp/x.log"));
        assert_eq!(o.log_level, LevelFilter::DEBUG);
        assert!(o.fail_open);
        assert_eq!(o.excluded_namespaces, vec!["a", "b"]);
        assert_eq!(o.timeout, Duration::from_millis(250));
        assert_eq!(c.runtime_config, Some(json!({"portMappings": []})));
        assert_eq!(c.prev_result, None, "null prevResult counts as absent");
        assert!(o.is_excluded("a") && !o.is_excluded("kube-system") && !o.is_excluded(""));
    }

    #[test]
    fn stdin_over_the_limit_is_code_6() {
        let mut big = br#"{"cniVersion":"1.0.0","name":"n","type":"t","x":""#.to_vec();
        big.resize(MAX_STDIN, b' ');
        big.extend_from_slice(b"\"}");
        let e = NetConf::parse(&big).unwrap_err();
        assert_eq!(e.code(), 6);
        assert!(e.msg().contains("limit"), "{}", e.msg());
        assert_eq!(peek_version(&big), None);
    }

    #[test]
    fn decode_errors_are_code_6() {
        for bad in [&b""[..], b"{", b"not json", b"[1,2]", b"\"s\"", b"\xff\xfe"] {
            let e = NetConf::parse(bad).unwrap_err();
            assert_eq!(e.code(), 6, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn missing_or_mistyped_required_fields_are_code_7() {
        let cases = [
            json!({"name": "n", "type": "t"}),
            json!({"cniVersion": 1, "name": "n", "type": "t"}),
            json!({"cniVersion": "1.0.0", "type": "t"}),
            json!({"cniVersion": "1.0.0", "name": "", "type": "t"}),
            json!({"cniVersion": "1.0.0", "name": 3, "type": "t"}),
            json!({"cniVersion": "1.0.0", "name": "n"}),
        ];
        for c in cases {
            let e = parse(c.clone()).unwrap_err();
            assert_eq!(e.code(), 7, "{c}");
        }
    }

    #[test]
    fn unknown_version_is_code_1() {
        let e = parse(json!({"cniVersion": "9.9.9", "name": "n", "type": "t"})).unwrap_err();
        assert_eq!(e.code(), 1);
        assert!(e.msg().contains("9.9.9"));
    }

    #[test]
    fn mistyped_options_are_code_7() {
        let base = json!({"cniVersion": "1.0.0", "name": "n", "type": "t"});
        for (k, v) in [
            ("failOpen", json!("yes")),
            ("timeoutMs", json!(0)),
            ("timeoutMs", json!(-5)),
            ("timeoutMs", json!(1.5)),
            ("timeoutMs", json!(MAX_TIMEOUT_MS + 1)),
            ("excludedNamespaces", json!("kube-system")),
            ("excludedNamespaces", json!(["ok", 1])),
            ("agentSocket", json!(5)),
            ("agentSocket", json!("")),
            ("logFile", json!(false)),
            ("logLevel", json!("loud")),
        ] {
            let mut c = base.clone();
            c[k] = v.clone();
            let e = parse(c).unwrap_err();
            assert_eq!(e.code(), 7, "{k}={v}");
            assert!(e.msg().contains(k), "{k}: {}", e.msg());
        }
    }

    #[test]
    fn gc_attachments_from_both_keys() {
        let c = parse(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/valid-attachments": [
                {"containerID": "a", "ifname": "eth0"},
                {"containerID": "b", "ifname": "eth0"}
            ],
            "cni.dev/attachments": [
                {"containerID": "b", "ifname": "eth0"},
                {"containerID": "c", "ifname": "net1", "extra": 1}
            ]
        }))
        .unwrap();
        let got = c.valid_attachments().unwrap().unwrap();
        let ids: Vec<_> = got
            .iter()
            .map(|a| (a.container_id.as_str(), a.if_name.as_str()))
            .collect();
        assert_eq!(ids, [("a", "eth0"), ("b", "eth0"), ("c", "net1")]);

        let none = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t"})).unwrap();
        assert_eq!(none.valid_attachments().unwrap(), None);

        let bad = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/attachments": [{"containerID": "a"}]}))
        .unwrap();
        assert_eq!(bad.valid_attachments().unwrap_err().code(), 7);
    }

    #[test]
    fn peeks_are_lenient() {
        assert_eq!(peek_version(b"garbage"), None);
        assert_eq!(peek_version(br#"{"cniVersion":"7.0.0"}"#), None);
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#),
            Some(CniVersion::V0_4_0)
        );
        assert_eq!(
            peek_logging(b""),
            (PathBuf::from(DEFAULT_LOG_FILE), LevelFilter::INFO)
        );
        assert_eq!(
            peek_logging(br#"{"logFile":"/tmp/l","logLevel":"trace","failOpen":"x"}"#),
            (PathBuf::from("/tmp/l"), LevelFilter::TRACE)
        );
    }
}
