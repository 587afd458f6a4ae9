//! The CNI spec versions this plugin speaks, and the VERSION command's answer.

use std::fmt;
use std::str::FromStr;

use serde_json::json;

use crate::error::CniError;

/// A CNI spec version the plugin supports, ordered oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::incompatible_version(format!("unsupported cniVersion {s:?}"))
                    .with_details(format!("supported versions: {}", supported().join(", ")))
            })
    }
}

/// The supported versions as strings, oldest first.
pub fn supported() -> Vec<&'static str> {
    CniVersion::ALL.iter().map(|v| v.as_str()).collect()
}

/// The VERSION command's output. `requested` is the cniVersion on stdin, if it is one we know;
/// otherwise the answer is in the latest version we speak.
pub fn version_info(requested: Option<CniVersion>) -> String {
    json!({
        "cniVersion": requested.unwrap_or(CniVersion::LATEST).as_str(),
        "supportedVersions": supported(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_supported_version_round_trips() {
        for s in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let v: CniVersion = s.parse().unwrap();
            assert_eq!(v.as_str(), s);
            assert_eq!(v.to_string(), s);
        }
        assert_eq!(supported(), ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    }

    #[test]
    fn unknown_versions_are_incompatible() {
        for s in ["0.1.0", "0.2.0", "1.2.0", "", "1.0", "v1.0.0", " 1.0.0"] {
            let e = s.parse::<CniVersion>().unwrap_err();
            assert_eq!(e.code(), 1, "{s:?}");
        }
    }

    #[test]
    fn feature_gates() {
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        assert!(CniVersion::V0_3_0 < CniVersion::V1_1_0);
    }

    #[test]
    fn version_info_echoes_request_or_latest() {
        let v: Value = serde_json::from_str(&version_info(Some(CniVersion::V0_4_0))).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let v: Value = serde_json::from_str(&version_info(None)).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
