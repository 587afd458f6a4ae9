//! The previous plugin's result: what this plugin reads from it (the pod's addresses and
//! gateways) and how it is passed on (verbatim, in the request's cniVersion).
//!
//! Both result shapes are accepted: 0.3.x (`ips[].version` is "4" or "6") and 0.4.0/1.x (no
//! `version`). Only `ips` is used; `interfaces`, `routes` and `dns` are type-checked so that
//! a broken chain is reported here instead of being passed on, and every other key is kept.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::error::CniError;
use crate::version::CniVersion;

/// One `ips[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`, when given.
    pub interface: Option<u64>,
}

/// What this plugin reads from prevResult.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrevResult {
    pub ips: Vec<IpConfig>,
    pub interface_names: Vec<String>,
}

impl PrevResult {
    /// Decodes and checks prevResult; every shape error is code 6 and names the field.
    pub fn decode(v: &Value) -> Result<Self, CniError> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("prevResult", "must be a JSON object"))?;
        let interface_names = decode_interfaces(obj)?;
        let ips = match field(obj, "ips") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, e)| decode_ip(i, e))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("prevResult.ips", "must be a list")),
        };
        // An index must name an entry of `interfaces`: checked before anything is contacted.
        for (i, ip) in ips.iter().enumerate() {
            if let Some(n) = ip.interface {
                if n >= interface_names.len() as u64 {
                    return Err(bad(
                        &format!("prevResult.ips[{i}].interface"),
                        &format!(
                            "index {n} is past the end of prevResult.interfaces ({} entries)",
                            interface_names.len()
                        ),
                    ));
                }
            }
        }
        decode_routes(obj)?;
        decode_dns(obj)?;
        Ok(PrevResult {
            ips,
            interface_names,
        })
    }

    /// The pod's addresses, v4 and v6, without duplicates, in prevResult's order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        dedup(self.ips.iter().map(|c| c.address))
    }

    /// The gateways prevResult names, without duplicates, in order.
    pub fn gateways(&self) -> Vec<IpAddr> {
        dedup(self.ips.iter().filter_map(|c| c.gateway))
    }
}

/// prevResult as this plugin's ADD output: every field kept, `cniVersion` set to the request's.
pub fn to_output(prev: &Value, version: CniVersion) -> Result<String, CniError> {
    let mut out: Map<String, Value> = prev
        .as_object()
        .cloned()
        .ok_or_else(|| bad("prevResult", "must be a JSON object"))?;
    out.insert(
        "cniVersion".to_string(),
        Value::String(version.as_str().to_string()),
    );
    serde_json::to_string(&Value::Object(out))
        .map_err(|e| CniError::io("failed to encode the result").with_details(e.to_string()))
}

fn dedup(it: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ip in it {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn bad(path: &str, why: &str) -> CniError {
    CniError::decode(format!("invalid prevResult: {path} {why}")).with_details(
        "ambient-cni must be chained after a primary plugin that returns a CNI result",
    )
}

fn decode_interfaces(obj: &Map<String, Value>) -> Result<Vec<String>, CniError> {
    let list = match field(obj, "interfaces") {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("prevResult.interfaces", "must be a list")),
    };
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let path = format!("prevResult.interfaces[{i}]");
            let o = e
                .as_object()
                .ok_or_else(|| bad(&path, "must be an object"))?;
            for key in ["mac", "sandbox", "socketPath"] {
                check_str(o, &path, key)?;
            }
            check_uint(o, &path, "mtu")?;
            match o.get("name") {
                Some(Value::String(n)) => Ok(n.clone()),
                _ => Err(bad(&format!("{path}.name"), "must be a string")),
            }
        })
        .collect()
}

fn decode_ip(i: usize, e: &Value) -> Result<IpConfig, CniError> {
    let path = format!("prevResult.ips[{i}]");
    let o = e
        .as_object()
        .ok_or_else(|| bad(&path, "must be an object"))?;
    let address = match o.get("address") {
        Some(Value::String(s)) => s,
        _ => return Err(bad(&format!("{path}.address"), "must be a string")),
    };
    let (address, prefix_len) = parse_cidr(address).ok_or_else(|| {
        bad(
            &format!("{path}.address"),
            &format!("{address:?} is not an IP address in CIDR notation"),
        )
    })?;
    // 0.3.x names the family; when it does, it must agree with the address.
    match field(o, "version") {
        None => {}
        Some(Value::String(v)) if v == "4" && address.is_ipv4() => {}
        Some(Value::String(v)) if v == "6" && address.is_ipv6() => {}
        Some(v) => {
            return Err(bad(
                &format!("{path}.version"),
                &format!("{v} does not match the address family of {address}"),
            ))
        }
    }
    let gateway = match field(o, "gateway") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.parse::<IpAddr>().map_err(|_| {
            bad(
                &format!("{path}.gateway"),
                &format!("{s:?} is not an IP address"),
            )
        })?),
        Some(_) => return Err(bad(&format!("{path}.gateway"), "must be a string")),
    };
    let interface = match field(o, "interface") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            bad(
                &format!("{path}.interface"),
                "must be a non-negative integer",
            )
        })?),
    };
    Ok(IpConfig {
        address,
        prefix_len,
        gateway,
        interface,
    })
}

fn decode_routes(obj: &Map<String, Value>) -> Result<(), CniError> {
    let list = match field(obj, "routes") {
        None => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("prevResult.routes", "must be a list")),
    };
    for (i, r) in list.iter().enumerate() {
        let path = format!("prevResult.routes[{i}]");
        let o = r
            .as_object()
            .ok_or_else(|| bad(&path, "must be an object"))?;
        match o.get("dst") {
            Some(Value::String(d)) if parse_cidr(d).is_some() => {}
            _ => return Err(bad(&format!("{path}.dst"), "must be a CIDR string")),
        }
        match field(o, "gw") {
            None => {}
            Some(Value::String(g)) if g.is_empty() || g.parse::<IpAddr>().is_ok() => {}
            Some(_) => return Err(bad(&format!("{path}.gw"), "must be an IP address")),
        }
        // 1.1.0's route attributes.
        for key in ["mtu", "advmss", "priority", "table", "scope"] {
            check_uint(o, &path, key)?;
        }
    }
    Ok(())
}

fn decode_dns(obj: &Map<String, Value>) -> Result<(), CniError> {
    let Some(dns) = field(obj, "dns") else {
        return Ok(());
    };
    let o = dns
        .as_object()
        .ok_or_else(|| bad("prevResult.dns", "must be an object"))?;
    check_str(o, "prevResult.dns", "domain")?;
    for key in ["nameservers", "search", "options"] {
        match field(o, key) {
            None => {}
            Some(Value::Array(list)) if list.iter().all(Value::is_string) => {}
            Some(_) => {
                return Err(bad(
                    &format!("prevResult.dns.{key}"),
                    "must be a list of strings",
                ))
            }
        }
    }
    Ok(())
}

/// An optional string field of `o` (at `path`).
fn check_str(o: &Map<String, Value>, path: &str, key: &str) -> Result<(), CniError> {
    match field(o, key) {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(bad(&format!("{path}.{key}"), "must be a string")),
    }
}

/// An optional non-negative integer field of `o` (at `path`).
fn check_uint(o: &Map<String, Value>, path: &str, key: &str) -> Result<(), CniError> {
    match field(o, key) {
        None => Ok(()),
        Some(v) if v.as_u64().is_some() => Ok(()),
        Some(_) => Err(bad(
            &format!("{path}.{key}"),
            "must be a non-negative integer",
        )),
    }
}

/// "10.244.1.5/24" or "fd00::5/64" → (address, prefix length). The prefix is required.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.244.1.5/24"),
            Some(("10.244.1.5".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("fd00:10:244::5/128"),
            Some(("fd00:10:244::5".parse().unwrap(), 128))
        );
        for bad in [
            "10.244.1.5",
            "10.244.1.5/",
            "10.244.1.5/33",
            "fd00::1/129",
            "10.244.1/24",
            "x/24",
            "10.0.0.1/+4",
            "10.0.0.1/24/1",
            "",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decodes_0_3_1_shape() {
        let v = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": [
                {"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
            "dns": {}
        });
        let r = PrevResult::decode(&v).unwrap();
        assert_eq!(r.interface_names, ["veth1", "eth0"]);
        assert_eq!(
            r.addresses(),
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            r.gateways(),
            vec![
                "10.244.1.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(r.ips[0].prefix_len, 24);
        assert_eq!(r.ips[1].interface, Some(1));
    }

    #[test]
    fn decodes_1_0_shape_and_dedups() {
        let v = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": [
                {"address": "10.244.7.9/32", "gateway": "10.244.7.1", "interface": 0},
                {"address": "10.244.7.9/32", "gateway": "10.244.7.1"}
            ]
        });
        let r = PrevResult::decode(&v).unwrap();
        assert_eq!(r.addresses().len(), 1);
        assert_eq!(r.gateways().len(), 1);
        assert_eq!(
            PrevResult::decode(&json!({})).unwrap(),
            PrevResult::default()
        );
    }

    #[test]
    fn shape_errors_are_code_6_and_name_the_field() {
        let cases = [
            (json!([]), "prevResult"),
            (json!("x"), "prevResult"),
            (json!({"ips": {}}), "prevResult.ips"),
            (json!({"ips": ["10.0.0.1/24"]}), "prevResult.ips[0]"),
            (json!({"ips": [{}]}), "prevResult.ips[0].address"),
            (
                json!({"ips": [{"address": 5}]}),
                "prevResult.ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/24"}, {"address": "nope/24"}]}),
                "prevResult.ips[1].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1"}]}),
                "prevResult.ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/24", "gateway": "10.0.0"}]}),
                "prevResult.ips[0].gateway",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/24", "version": "6"}]}),
                "prevResult.ips[0].version",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
                "prevResult.ips[0].interface",
            ),
            (
                json!({"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.1/24", "interface": 0}, {"address": "10.0.0.2/24", "interface": 1}]}),
                "prevResult.ips[1].interface",
            ),
            (json!({"interfaces": {}}), "prevResult.interfaces"),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                "prevResult.interfaces[0].name",
            ),
            (
                json!({"routes": [{"gw": "10.0.0.1"}]}),
                "prevResult.routes[0].dst",
            ),
            (json!({"dns": []}), "prevResult.dns"),
            (
                json!({"dns": {"nameservers": "10.96.0.10"}}),
                "prevResult.dns.nameservers",
            ),
            (json!({"dns": {"domain": 1}}), "prevResult.dns.domain"),
            (
                json!({"routes": [{"dst": "0.0.0.0/0", "mtu": "1500"}]}),
                "prevResult.routes[0].mtu",
            ),
            (
                json!({"interfaces": [{"name": "eth0", "mtu": -1}]}),
                "prevResult.interfaces[0].mtu",
            ),
            (
                json!({"interfaces": [{"name": "eth0", "sandbox": 1}]}),
                "prevResult.interfaces[0].sandbox",
            ),
        ];
        for (v, path) in cases {
            let e = PrevResult::decode(&v).unwrap_err();
            assert_eq!(e.code(), 6, "{v}");
            assert!(e.msg().contains(path), "{v}: {}", e.msg());
        }
    }

    #[test]
    fn output_keeps_everything_and_sets_version() {
        let v = json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.0.0.2/24"}],
            "x-vendor": {"nested": [1, 2.5, null, "s"]},
        });
        let out: Value = serde_json::from_str(&to_output(&v, CniVersion::V0_4_0).unwrap()).unwrap();
        let mut expected = v.clone();
        expected["cniVersion"] = json!("0.4.0");
        assert_eq!(out, expected);
        assert_eq!(
            to_output(&json!(1), CniVersion::V1_0_0).unwrap_err().code(),
            6
        );
    }
}
