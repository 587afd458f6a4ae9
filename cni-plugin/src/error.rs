//! The plugin's one error type and its CNI error JSON (spec 1.1.0, "Error" section).
//!
//! Every failure the plugin can report is a [`CniError`]; its variant decides the well-known
//! CNI error code, `msg` is a short human sentence and `details` carries the underlying cause.

use serde::Serialize;

/// A failure reported to the runtime as `{"cniVersion","code","msg","details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// 1: the request's cniVersion is unknown, or the command does not exist in that version.
    #[error("{msg}")]
    IncompatibleVersion { msg: String, details: String },
    /// 2: a configuration field the plugin cannot honour.
    #[error("{msg}")]
    UnsupportedField { msg: String, details: String },
    /// 3: the container is unknown or does not exist.
    #[error("{msg}")]
    UnknownContainer { msg: String, details: String },
    /// 4: a required CNI_* variable is missing or malformed.
    #[error("{msg}")]
    InvalidEnv { msg: String, details: String },
    /// 5: an I/O failure (also: the agent failed for a reason retrying will not fix).
    #[error("{msg}")]
    Io { msg: String, details: String },
    /// 6: stdin or prevResult could not be decoded.
    #[error("{msg}")]
    Decode { msg: String, details: String },
    /// 7: the network configuration is invalid (missing field, wrong type, not chained).
    #[error("{msg}")]
    InvalidConfig { msg: String, details: String },
    /// 11: transient; the runtime should retry (agent unreachable, agent not ready).
    #[error("{msg}")]
    TryAgainLater { msg: String, details: String },
    /// 50: STATUS: the plugin cannot serve ADD now.
    #[error("{msg}")]
    NotAvailable { msg: String, details: String },
    /// 51: STATUS: not available, and existing containers may have limited connectivity.
    #[error("{msg}")]
    NotAvailableLimited { msg: String, details: String },
}

/// The JSON object printed on stdout for an error.
#[derive(Serialize)]
struct ErrorJson<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

macro_rules! ctor {
    ($fn:ident, $variant:ident) => {
        pub fn $fn(msg: impl Into<String>) -> Self {
            CniError::$variant {
                msg: msg.into(),
                details: String::new(),
            }
        }
    };
}

impl CniError {
    ctor!(incompatible_version, IncompatibleVersion);
    ctor!(unsupported_field, UnsupportedField);
    ctor!(unknown_container, UnknownContainer);
    ctor!(invalid_env, InvalidEnv);
    ctor!(io, Io);
    ctor!(decode, Decode);
    ctor!(invalid_config, InvalidConfig);
    ctor!(try_again_later, TryAgainLater);
    ctor!(not_available, NotAvailable);
    ctor!(not_available_limited, NotAvailableLimited);

    /// The same error with `details` set (the underlying cause, for operators).
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        *self.parts_mut().1 = details.into();
        self
    }

    /// The CNI well-known error code.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => 1,
            CniError::UnsupportedField { .. } => 2,
            CniError::UnknownContainer { .. } => 3,
            CniError::InvalidEnv { .. } => 4,
            CniError::Io { .. } => 5,
            CniError::Decode { .. } => 6,
            CniError::InvalidConfig { .. } => 7,
            CniError::TryAgainLater { .. } => 11,
            CniError::NotAvailable { .. } => 50,
            CniError::NotAvailableLimited { .. } => 51,
        }
    }

    pub fn msg(&self) -> &str {
        self.parts().0
    }

    pub fn details(&self) -> &str {
        self.parts().1
    }

    /// The error as the CNI error JSON, in the given (request's) cniVersion.
    pub fn to_json(&self, cni_version: &str) -> String {
        let doc = ErrorJson {
            cni_version,
            code: self.code(),
            msg: self.msg(),
            details: self.details(),
        };
        // Serializing a struct of strings and an integer cannot fail; the fallback keeps this
        // path free of panics all the same.
        serde_json::to_string(&doc).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{}","code":{},"msg":"internal error"}}"#,
                cni_version.escape_default(),
                self.code()
            )
        })
    }

    fn parts(&self) -> (&str, &str) {
        match self {
            CniError::IncompatibleVersion { msg, details }
            | CniError::UnsupportedField { msg, details }
            | CniError::UnknownContainer { msg, details }
            | CniError::InvalidEnv { msg, details }
            | CniError::Io { msg, details }
            | CniError::Decode { msg, details }
            | CniError::InvalidConfig { msg, details }
            | CniError::TryAgainLater { msg, details }
            | CniError::NotAvailable { msg, details }
            | CniError::NotAvailableLimited { msg, details } => (msg, details),
        }
    }

    fn parts_mut(&mut self) -> (&mut String, &mut String) {
        match self {
            CniError::IncompatibleVersion { msg, details }
            | CniError::UnsupportedField { msg, details }
            | CniError::UnknownContainer { msg, details }
            | CniError::InvalidEnv { msg, details }
            | CniError::Io { msg, details }
            | CniError::Decode { msg, details }
            | CniError::InvalidConfig { msg, details }
            | CniError::TryAgainLater { msg, details }
            | CniError::NotAvailable { msg, details }
            | CniError::NotAvailableLimited { msg, details } => (msg, details),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn codes_match_the_spec_table() {
        let all = [
            (CniError::incompatible_version("x"), 1),
            (CniError::unsupported_field("x"), 2),
            (CniError::unknown_container("x"), 3),
            (CniError::invalid_env("x"), 4),
            (CniError::io("x"), 5),
            (CniError::decode("x"), 6),
            (CniError::invalid_config("x"), 7),
            (CniError::try_again_later("x"), 11),
            (CniError::not_available("x"), 50),
            (CniError::not_available_limited("x"), 51),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }

    #[test]
    fn json_carries_version_code_msg_details() {
        let e = CniError::invalid_env("CNI_IFNAME is missing").with_details("set it");
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0", "code": 4, "msg": "CNI_IFNAME is missing", "details": "set it"})
        );
    }

    #[test]
    fn json_escapes_and_omits_empty_details() {
        let e = CniError::decode("bad \"quote\"\nnewline");
        let v: Value = serde_json::from_str(&e.to_json("0.3.1")).unwrap();
        assert_eq!(v["msg"], "bad \"quote\"\nnewline");
        assert!(v.get("details").is_none());
        assert_eq!(e.to_string(), "bad \"quote\"\nnewline");
    }
}
