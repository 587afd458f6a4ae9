//! The CNI_* environment: which command, which container, which netns and interface, and the
//! runtime's CNI_ARGS (Kubernetes passes the pod's namespace, name and UID there).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use crate::error::CniError;

/// The environment as the plugin received it: variable name → value.
pub type EnvMap = HashMap<String, String>;

pub const CNI_COMMAND: &str = "CNI_COMMAND";
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
pub const CNI_NETNS: &str = "CNI_NETNS";
pub const CNI_IFNAME: &str = "CNI_IFNAME";
pub const CNI_ARGS: &str = "CNI_ARGS";
pub const CNI_PATH: &str = "CNI_PATH";

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;
/// The longest CNI_CONTAINERID / CNI_NETNS accepted (PATH_MAX; runtimes send 64-hex ids and
/// short paths): anything longer is a broken or hostile caller, refused before it reaches the
/// log or the agent.
pub const MAX_ENV_VALUE_LEN: usize = 4096;
/// The longest CNI_ARGS accepted (Kubernetes sends well under 1 KiB).
pub const MAX_CNI_ARGS_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(
                    CniError::invalid_env(format!("unknown CNI_COMMAND {other:?}")).with_details(
                        "expected one of ADD, DEL, CHECK, VERSION, STATUS, GC".to_string(),
                    ),
                )
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// Which variables the spec requires for this command (CNI_PATH is left out: this plugin
    /// never execs a delegate, so it has no use for it).
    fn requires(self, var: &str) -> bool {
        match self {
            Command::Add | Command::Check => {
                matches!(var, CNI_CONTAINERID | CNI_NETNS | CNI_IFNAME)
            }
            // DEL must work after the netns is gone, so CNI_NETNS is optional.
            Command::Del => matches!(var, CNI_CONTAINERID | CNI_IFNAME),
            Command::Version | Command::Status | Command::Gc => false,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parsed CNI_ARGS. Kubernetes runtimes send `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`, `K8S_POD_INFRA_CONTAINER_ID` and often `IgnoreUnknown=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub ignore_unknown: bool,
    /// Every other pair, in order. Unknown keys are always tolerated (whatever IgnoreUnknown
    /// says): a chained plugin must not fail pods because the runtime passes extra keys.
    pub other: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Empty segments (e.g. a trailing `;`) are skipped; a segment without
    /// `=` or with an empty key is an error (code 4). A value may itself contain `=`.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.trim().is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid_args(pair, "expected KEY=VALUE"));
            };
            let key = key.trim();
            if key.is_empty() {
                return Err(invalid_args(pair, "empty key"));
            }
            let value = value.to_string();
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = Some(value),
                "K8S_POD_NAME" => args.pod_name = Some(value),
                "K8S_POD_UID" => args.pod_uid = Some(value),
                "IgnoreUnknown" => {
                    args.ignore_unknown = matches!(
                        value.to_ascii_lowercase().as_str(),
                        "1" | "true" | "yes" | "on"
                    )
                }
                _ => args.other.push((key.to_string(), value)),
            }
        }
        Ok(args)
    }
}

fn invalid_args(pair: &str, why: &str) -> CniError {
    CniError::invalid_env(format!("invalid CNI_ARGS pair {pair:?}: {why}"))
        .with_details("CNI_ARGS must be KEY=VALUE pairs separated by ';'".to_string())
}

/// The CNI environment of one invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Present (non-empty, valid) when the command requires it; may be present otherwise.
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub if_name: Option<String>,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads and validates the environment. Errors are code 4 and name the variable.
    pub fn from_map(env: &EnvMap) -> Result<Self, CniError> {
        let command = match non_empty(env, CNI_COMMAND) {
            Some(c) => Command::parse(c)?,
            None => return Err(missing(CNI_COMMAND)),
        };
        let get = |var: &str| -> Result<Option<String>, CniError> {
            match non_empty(env, var) {
                Some(v) => Ok(Some(v.to_string())),
                None if command.requires(var) => Err(missing(var)),
                None => Ok(None),
            }
        };
        for (var, max) in [
            (CNI_CONTAINERID, MAX_ENV_VALUE_LEN),
            (CNI_NETNS, MAX_ENV_VALUE_LEN),
            (CNI_IFNAME, MAX_ENV_VALUE_LEN),
            (CNI_ARGS, MAX_CNI_ARGS_LEN),
        ] {
            if let Some(v) = env.get(var).filter(|v| v.len() > max) {
                return Err(
                    CniError::invalid_env(format!("{var} is longer than {max} bytes"))
                        .with_details(format!("{} bytes", v.len())),
                );
            }
        }
        let container_id = get(CNI_CONTAINERID)?;
        let netns = get(CNI_NETNS)?;
        let if_name = get(CNI_IFNAME)?;
        if let Some(id) = &container_id {
            validate_container_id(id)?;
        }
        if let Some(name) = &if_name {
            validate_if_name(name)?;
        }
        // Only the pod commands use CNI_ARGS; VERSION/STATUS/GC must not fail on them.
        let args = match env.get(CNI_ARGS) {
            Some(a) if matches!(command, Command::Add | Command::Check | Command::Del) => {
                CniArgs::parse(a)?
            }
            _ => CniArgs::default(),
        };
        let path = env
            .get(CNI_PATH)
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id,
            netns,
            if_name,
            args,
            path,
        })
    }

    /// The container id, or "" when the command does not carry one.
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or("")
    }

    pub fn if_name(&self) -> &str {
        self.if_name.as_deref().unwrap_or("")
    }

    pub fn netns(&self) -> &str {
        self.netns.as_deref().unwrap_or("")
    }

    pub fn pod_namespace(&self) -> &str {
        self.args.pod_namespace.as_deref().unwrap_or("")
    }

    pub fn pod_name(&self) -> &str {
        self.args.pod_name.as_deref().unwrap_or("")
    }
}

fn non_empty<'a>(env: &'a EnvMap, var: &str) -> Option<&'a str> {
    env.get(var).map(String::as_str).filter(|v| !v.is_empty())
}

fn missing(var: &str) -> CniError {
    CniError::invalid_env(format!(
        "required environment variable {var} is missing or empty"
    ))
}

/// Same rule as the reference implementation: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`. The id ends up in
/// logs and in the agent's records, so nothing else is let through.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(
            CniError::invalid_env(format!("invalid characters in {CNI_CONTAINERID}"))
                .with_details(id.escape_default().to_string()),
        )
    }
}

/// A Linux interface name: 1..=15 bytes, not "." or "..", no '/', ':' or whitespace.
fn validate_if_name(name: &str) -> Result<(), CniError> {
    let why = if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(
            CniError::invalid_env(format!("invalid {CNI_IFNAME}: {why}"))
                .with_details(name.escape_default().to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_requires_id_netns_ifname_and_names_the_missing_one() {
        let full = [
            (CNI_COMMAND, "ADD"),
            (CNI_CONTAINERID, "abc"),
            (CNI_NETNS, "/var/run/netns/x"),
            (CNI_IFNAME, "eth0"),
        ];
        assert!(CniEnv::from_map(&env(&full)).is_ok());
        for skip in [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME] {
            for cmd in ["ADD", "CHECK"] {
                let mut m = env(&full);
                m.insert(CNI_COMMAND.into(), cmd.into());
                m.remove(skip);
                let e = CniEnv::from_map(&m).unwrap_err();
                assert_eq!(e.code(), 4);
                assert!(e.msg().contains(skip), "{cmd} {skip}: {}", e.msg());
                // Empty counts as missing.
                m.insert(skip.into(), String::new());
                let e = CniEnv::from_map(&m).unwrap_err();
                assert!(e.msg().contains(skip));
            }
        }
    }

    #[test]
    fn oversized_values_are_code_4_and_name_the_variable() {
        let big = "a".repeat(MAX_ENV_VALUE_LEN + 1);
        for var in [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME] {
            let mut m = env(&[
                (CNI_COMMAND, "ADD"),
                (CNI_CONTAINERID, "abc"),
                (CNI_NETNS, "/var/run/netns/x"),
                (CNI_IFNAME, "eth0"),
            ]);
            m.insert(var.into(), big.clone());
            let e = CniEnv::from_map(&m).unwrap_err();
            assert_eq!(e.code(), 4, "{var}");
            assert!(e.msg().contains(var), "{}", e.msg());
        }
        let m = env(&[
            (CNI_COMMAND, "DEL"),
            (CNI_CONTAINERID, "abc"),
            (CNI_IFNAME, "eth0"),
            (
                CNI_ARGS,
                &format!("K8S_POD_NAME={}", "x".repeat(MAX_CNI_ARGS_LEN)),
            ),
        ]);
        assert!(CniEnv::from_map(&m).unwrap_err().msg().contains(CNI_ARGS));
    }

    #[test]
    fn del_does_not_need_netns() {
        let m = env(&[
            (CNI_COMMAND, "DEL"),
            (CNI_CONTAINERID, "abc"),
            (CNI_IFNAME, "eth0"),
        ]);
        let e = CniEnv::from_map(&m).unwrap();
        assert_eq!(e.command, Command::Del);
        assert_eq!(e.netns, None);
        let m = env(&[(CNI_COMMAND, "DEL"), (CNI_IFNAME, "eth0")]);
        assert!(CniEnv::from_map(&m)
            .unwrap_err()
            .msg()
            .contains(CNI_CONTAINERID));
    }

    #[test]
    fn version_status_gc_need_only_the_command() {
        for cmd in ["VERSION", "STATUS", "GC"] {
            let e = CniEnv::from_map(&env(&[(CNI_COMMAND, cmd)])).unwrap();
            assert_eq!(e.command.as_str(), cmd);
        }
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        let e = CniEnv::from_map(&EnvMap::new()).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg().contains(CNI_COMMAND));
        let e = CniEnv::from_map(&env(&[(CNI_COMMAND, "add")])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg().contains("\"add\""));
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        for bad_id in ["-abc", "a/b", "a b", "ab\n", "_x"] {
            let m = env(&[
                (CNI_COMMAND, "DEL"),
                (CNI_CONTAINERID, bad_id),
                (CNI_IFNAME, "eth0"),
            ]);
            assert_eq!(CniEnv::from_map(&m).unwrap_err().code(), 4, "{bad_id:?}");
        }
        for bad_if in ["a234567890123456", ".", "..", "et/h0", "eth:0", "eth 0"] {
            let m = env(&[
                (CNI_COMMAND, "DEL"),
                (CNI_CONTAINERID, "abc"),
                (CNI_IFNAME, bad_if),
            ]);
            let e = CniEnv::from_map(&m).unwrap_err();
            assert_eq!(e.code(), 4, "{bad_if:?}");
            assert!(e.msg().contains(CNI_IFNAME));
        }
        let m = env(&[
            (CNI_COMMAND, "DEL"),
            (CNI_CONTAINERID, "0123abc_def.g-h"),
            (CNI_IFNAME, "a23456789012345"),
        ]);
        assert!(CniEnv::from_map(&m).is_ok());
    }

    #[test]
    fn cni_args_kubernetes_keys() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.pod_uid.as_deref(), Some("1234-5678"));
        assert!(a.ignore_unknown);
        assert_eq!(
            a.other,
            vec![("K8S_POD_INFRA_CONTAINER_ID".to_string(), "abc".to_string())]
        );
    }

    #[test]
    fn cni_args_edge_cases() {
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        let a = CniArgs::parse("K8S_POD_NAME=x;").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("x"));
        assert!(!a.ignore_unknown);
        let a = CniArgs::parse("A=b=c;IgnoreUnknown=true").unwrap();
        assert_eq!(a.other, vec![("A".to_string(), "b=c".to_string())]);
        assert!(a.ignore_unknown);
        let a = CniArgs::parse("K8S_POD_NAME=").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some(""));
    }

    #[test]
    fn malformed_cni_args_are_code_4() {
        for bad in ["K8S_POD_NAME", "A=1;B", "=x", "A=1;;=2"] {
            let e = CniArgs::parse(bad).unwrap_err();
            assert_eq!(e.code(), 4, "{bad:?}");
            assert!(e.msg().contains("CNI_ARGS"));
        }
        let m = env(&[
            (CNI_COMMAND, "DEL"),
            (CNI_CONTAINERID, "abc"),
            (CNI_IFNAME, "eth0"),
            (CNI_ARGS, "nonsense"),
        ]);
        assert_eq!(CniEnv::from_map(&m).unwrap_err().code(), 4);
        // VERSION never looks at CNI_ARGS.
        let m = env(&[(CNI_COMMAND, "VERSION"), (CNI_ARGS, "nonsense")]);
        assert!(CniEnv::from_map(&m).is_ok());
    }

    #[test]
    fn cni_path_is_split() {
        let m = env(&[
            (CNI_COMMAND, "VERSION"),
            (CNI_PATH, "/opt/cni/bin::/usr/lib/cni"),
        ]);
        let e = CniEnv::from_map(&m).unwrap();
        assert_eq!(
            e.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }
}
