//! The CNI plugin ↔ node agent protocol: one JSON request and one JSON reply per connection
//! on the agent's root-only unix socket, each a single line.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The pod as the CNI plugin sees it on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub container_id: String,
    pub if_name: String,
    /// The pod's netns path (CNI_NETNS).
    pub netns: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// The pod's addresses from prevResult, v4 and v6.
    pub ips: Vec<IpAddr>,
    /// The gateways prevResult names for those addresses (the node side of the pod's link).
    #[serde(default)]
    pub gateways: Vec<IpAddr>,
}

/// One attachment `GC` must keep (`cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub if_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Request {
    /// Enroll the pod if membership says so; the reply is the verdict.
    Add { pod: PodInfo },
    /// Remove the pod; succeeds when it is unknown.
    Del {
        container_id: String,
        if_name: String,
    },
    /// Is the pod's enrollment (set element, route) really in the kernel?
    Check {
        container_id: String,
        if_name: String,
    },
    /// Is the agent ready to enroll pods?
    Status,
    /// Drop every enrolled pod not in `valid`.
    Gc { valid: Vec<Attachment> },
}

impl Request {
    /// One request line as the agent reads it from its socket.
    pub fn decode(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Reply {
    Ok {
        /// For ADD/CHECK: whether the pod is (now) captured; `reason` says why or why not.
        #[serde(default)]
        enrolled: bool,
        #[serde(default)]
        reason: String,
    },
    Error {
        message: String,
        /// The failure is transient (e.g. no ztunnel yet); the runtime may retry.
        #[serde(default)]
        retry: bool,
    },
}

impl Reply {
    pub fn ok(enrolled: bool, reason: impl Into<String>) -> Self {
        Reply::Ok {
            enrolled,
            reason: reason.into(),
        }
    }
    pub fn error(message: impl Into<String>, retry: bool) -> Self {
        Reply::Error {
            message: message.into(),
            retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_as_tagged_json() {
        let r = Request::Del {
            container_id: "c1".into(),
            if_name: "eth0".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"del","containerId":"c1","ifName":"eth0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[test]
    fn decode_reads_the_line_as_the_agent_reads_it() {
        // read_line keeps the newline.
        assert_eq!(
            Request::decode("{\"op\":\"status\"}\n").unwrap(),
            Request::Status
        );
        for bad in [
            "",
            "{}",
            "{\"op\":\"add\"}",
            "{\"op\":\"status\"} x",
            "\u{0}",
        ] {
            assert!(Request::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reply_error_defaults_retry_false() {
        let r: Reply = serde_json::from_str(r#"{"result":"error","message":"x"}"#).unwrap();
        assert_eq!(r, Reply::error("x", false));
    }
}
