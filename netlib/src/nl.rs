//! rtnetlink: one handle per network namespace; observe and apply links, addresses, rules and
//! routes of a [`NetDesired`](crate::model::NetDesired), in place.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoGeneve, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::rule::{self as nlrule, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, LinkGeneve, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::model::{
    diff_routes, diff_rules, tunnel_action, NetDesired, RouteKey, RouteKind, RouteValue, Routes,
    RuleAction, RuleSpec, TunnelAction, TunnelKind, TunnelObserved, TunnelSpec,
};
use crate::sysctl;

/// Errors of netlink work, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("link {0} not found")]
    NoSuchLink(String),
    #[error("the kernel has no Geneve support (EOPNOTSUPP); use --tunnel auto or vxlan")]
    GeneveUnsupported,
    #[error("{0}")]
    Other(String),
}

impl NetError {
    /// The errno of a netlink error, if it is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            NetError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What one `apply` changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub tunnels: usize,
    pub rules: usize,
    pub routes: usize,
    pub sysctls: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// A netlink handle bound to one network namespace for its whole life.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A handle in the calling thread's namespace. Must be called inside a tokio runtime.
    pub fn current() -> io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A handle in the namespace at `netns`: the socket is opened on a thread that joined
    /// it, and keeps talking to that namespace afterwards.
    pub fn in_netns(netns: &Path) -> io::Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = crate::netns::run_in(netns, || {
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The raw rtnetlink handle, for callers with needs of their own (the lab).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    // ---------------------------------------------------------------- links

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::Netlink {
                what: format!("get link {name}"),
                source: e,
            }),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>, NetError> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::Netlink {
                what: format!("get link #{index}"),
                source: e,
            }),
        }
    }

    pub async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        self.link_by_name(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetError::NoSuchLink(name.into()))
    }

    /// A link's name and MTU.
    pub async fn link_name_mtu(&self, index: u32) -> Result<Option<(String, u32)>, NetError> {
        Ok(self.link_by_index(index).await?.and_then(|m| {
            let mtu = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            })?;
            Some((link_name(&m)?, mtu))
        }))
    }

    /// The name of the bridge (controller) a link is a port of, if any.
    pub async fn link_controller(&self, index: u32) -> Result<Option<String>, NetError> {
        let Some(m) = self.link_by_index(index).await? else {
            return Ok(None);
        };
        let Some(ctl) = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(c) => Some(*c),
            _ => None,
        }) else {
            return Ok(None);
        };
        Ok(self.link_by_index(ctl).await?.and_then(|c| link_name(&c)))
    }

    /// A link's MAC address as `aa:bb:cc:dd:ee:ff`.
    pub async fn link_mac(&self, name: &str) -> Result<String, NetError> {
        let m = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.into()))?;
        m.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) if b.len() == 6 => Some(
                    b.iter()
                        .map(|o| format!("{o:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                ),
                _ => None,
            })
            .ok_or_else(|| NetError::Other(format!("{name} has no MAC address")))
    }

    /// Every link's index → name.
    pub async fn link_names(&self) -> Result<BTreeMap<u32, String>, NetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                what: "list links".into(),
                source,
            })?;
        Ok(links
            .iter()
            .filter_map(|m| link_name(m).map(|n| (m.header.index, n)))
            .collect())
    }

    pub async fn delete_link(&self, name: &str) -> Result<bool, NetError> {
        let Some(m) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(m.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(NetError::Netlink {
                what: format!("delete link {name}"),
                source,
            }),
        }
    }

    /// The host-side peer index of a veth in this namespace (e.g. a pod's `eth0`).
    pub async fn veth_peer_index(&self, name: &str) -> Result<u32, NetError> {
        let m = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.into()))?;
        m.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Link(i) => Some(*i),
                _ => None,
            })
            .ok_or_else(|| NetError::Other(format!("{name} has no peer link (not a veth?)")))
    }

    /// The default IPv4 route's gateway and device index in the main table.
    pub async fn default_gateway(&self) -> Result<Option<(Ipv4Addr, u32)>, NetError> {
        Ok(match self.default_gateway_of(false).await? {
            Some((IpAddr::V4(g), oif)) => Some((g, oif)),
            _ => None,
        })
    }

    /// The default IPv6 route's gateway and device index in the main table.
    pub async fn default_gateway6(&self) -> Result<Option<(Ipv6Addr, u32)>, NetError> {
        Ok(match self.default_gateway_of(true).await? {
            Some((IpAddr::V6(g), oif)) => Some((g, oif)),
            _ => None,
        })
    }

    async fn default_gateway_of(&self, v6: bool) -> Result<Option<(IpAddr, u32)>, NetError> {
        for r in self.routes_of(v6).await? {
            if table_of(&r) != u32::from(RouteHeader::RT_TABLE_MAIN)
                || r.header.destination_prefix_length != 0
            {
                continue;
            }
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(IpAddr::V6(*g)),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if let (Some(gw), Some(oif)) = (gw, oif) {
                return Ok(Some((gw, oif)));
            }
        }
        Ok(None)
    }

    /// The first IPv4 address on a link.
    pub async fn link_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>, NetError> {
        Ok(self
            .addresses(index)
            .await?
            .into_iter()
            .find_map(|(a, _)| match a {
                IpAddr::V4(v4) => Some(v4),
                _ => None,
            }))
    }

    /// The first IPv6 address on a link that is not link-local.
    pub async fn link_ipv6(&self, index: u32) -> Result<Option<Ipv6Addr>, NetError> {
        Ok(self
            .addresses(index)
            .await?
            .into_iter()
            .find_map(|(a, _)| match a {
                IpAddr::V6(v6) if !is_link_local6(&v6) => Some(v6),
                _ => None,
            }))
    }

    async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("list addresses of #{index}"),
                source,
            })?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                        Some((*ip, m.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    // -------------------------------------------------------------- tunnels

    /// The attributes of the tunnel device `name`, if it exists.
    pub async fn observe_tunnel(&self, name: &str) -> Result<Option<TunnelObserved>, NetError> {
        Ok(self.link_by_name(name).await?.map(|m| tunnel_observed(&m)))
    }

    /// Creates one tunnel device (down, no address).
    pub async fn create_tunnel(&self, t: &TunnelSpec) -> Result<(), NetError> {
        let msg = tunnel_message(t);
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if t.kind == TunnelKind::Geneve && errno_of(&e) == Some(libc::EOPNOTSUPP) => {
                Err(NetError::GeneveUnsupported)
            }
            Err(source) => Err(NetError::Netlink {
                what: format!("create {:?} link {}", t.kind, t.end.name),
                source,
            }),
        }
    }

    /// Makes the tunnel device match `t`: created if missing, re-created if its kind, VNI,
    /// port or remote differ (those cannot change on a live device), MTU set in place; then
    /// its /30 address and up state.
    pub async fn ensure_tunnel(&self, t: &TunnelSpec) -> Result<bool, NetError> {
        let mut changed = false;
        match self.observe_tunnel(t.end.name).await? {
            None => {
                self.create_tunnel(t).await?;
                changed = true;
            }
            Some(have) => match tunnel_action(t, &have) {
                TunnelAction::Keep => {}
                TunnelAction::SetMtu => {
                    let idx = self.link_index(t.end.name).await?;
                    self.handle
                        .link()
                        .set(LinkUnspec::new_with_index(idx).mtu(t.mtu).build())
                        .execute()
                        .await
                        .map_err(|source| NetError::Netlink {
                            what: format!("set mtu of {}", t.end.name),
                            source,
                        })?;
                    changed = true;
                }
                TunnelAction::SetRemote => {
                    if self.set_tunnel_remote(t, &have).await.is_err() {
                        // A kernel that cannot change it in place: a new device.
                        self.delete_link(t.end.name).await?;
                        self.create_tunnel(t).await?;
                    }
                    changed = true;
                }
                TunnelAction::Recreate => {
                    self.delete_link(t.end.name).await?;
                    self.create_tunnel(t).await?;
                    changed = true;
                }
            },
        }
        let idx = self.link_index(t.end.name).await?;
        let addrs = self.addresses(idx).await?;
        let mut want = vec![(IpAddr::V4(t.end.addr), crate::consts::TUNNEL_PREFIX_LEN)];
        if t.v6 {
            want.push((IpAddr::V6(t.end.addr6), crate::consts::TUNNEL_PREFIX_LEN6));
        }
        for (addr, len) in want {
            if addrs.contains(&(addr, len)) {
                continue;
            }
            let mut req = self.handle.address().add(idx, addr, len);
            if addr.is_ipv6() {
                // No duplicate address detection: the /126 has exactly two ends, and a
                // tentative address answers no neighbour solicitation (the first second of
                // captured IPv6 traffic would be lost).
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute().await.map_err(|source| NetError::Netlink {
                what: format!("add {addr}/{len} to {}", t.end.name),
                source,
            })?;
            changed = true;
        }
        let m = self
            .link_by_index(idx)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(t.end.name.into()))?;
        if !m.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|source| NetError::Netlink {
                    what: format!("set {} up", t.end.name),
                    source,
                })?;
            changed = true;
        }
        Ok(changed)
    }

    /// Points a live tunnel at `t.remote` (changelink), sets its MTU if it differs, and
    /// forgets the neighbours learnt through it: they were the old peer's addresses.
    async fn set_tunnel_remote(
        &self,
        t: &TunnelSpec,
        have: &TunnelObserved,
    ) -> Result<(), NetError> {
        let idx = self.link_index(t.end.name).await?;
        let data = match (t.kind, t.remote) {
            (TunnelKind::Geneve, IpAddr::V4(r)) => InfoData::Geneve(vec![InfoGeneve::Remote(r)]),
            (TunnelKind::Geneve, IpAddr::V6(r)) => InfoData::Geneve(vec![InfoGeneve::Remote6(r)]),
            (TunnelKind::Vxlan, IpAddr::V4(r)) => InfoData::Vxlan(vec![InfoVxlan::Group(r)]),
            (TunnelKind::Vxlan, IpAddr::V6(r)) => InfoData::Vxlan(vec![InfoVxlan::Group6(r)]),
        };
        let kind = match t.kind {
            TunnelKind::Geneve => InfoKind::Geneve,
            TunnelKind::Vxlan => InfoKind::Vxlan,
        };
        let mut msg = LinkMessage::default();
        msg.header.index = idx;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(kind),
            LinkInfo::Data(data),
        ]));
        if have.mtu != Some(t.mtu) {
            msg.attributes.push(LinkAttribute::Mtu(t.mtu));
        }
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("set the remote of {} to {}", t.end.name, t.remote),
                source,
            })?;
        self.flush_neighbours(idx).await
    }

    /// Deletes every neighbour entry of link `index`.
    async fn flush_neighbours(&self, index: u32) -> Result<(), NetError> {
        let entries: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|source| NetError::Netlink {
                what: "list neighbours".into(),
                source,
            })?
            .into_iter()
            .filter(|n| n.header.ifindex == index)
            .collect();
        for n in entries {
            match self.handle.neighbours().del(n).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        what: format!("delete a neighbour of link #{index}"),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Does this kernel create Geneve links? Creates and removes a throwaway device.
    pub async fn geneve_supported(&self) -> Result<bool, NetError> {
        let name = format!("ambprobe{}", std::process::id() % 100_000);
        let probe = TunnelSpec {
            end: crate::consts::TunnelEnd {
                name: "",
                vni: 4242,
                addr: Ipv4Addr::UNSPECIFIED,
                peer: Ipv4Addr::UNSPECIFIED,
                addr6: Ipv6Addr::UNSPECIFIED,
                peer6: Ipv6Addr::UNSPECIFIED,
            },
            kind: TunnelKind::Geneve,
            port: 0,
            remote: Ipv4Addr::LOCALHOST.into(),
            mtu: 1400,
            v6: false,
        };
        let mut msg = tunnel_message(&probe);
        msg.attributes
            .retain(|a| !matches!(a, LinkAttribute::IfName(_)));
        msg.attributes.push(LinkAttribute::IfName(name.clone()));
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {
                self.delete_link(&name).await?;
                Ok(true)
            }
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(source) => Err(NetError::Netlink {
                what: "probe for Geneve support".into(),
                source,
            }),
        }
    }

    /// Resolves `--tunnel auto|geneve|vxlan` to a kind: auto takes Geneve unless the kernel
    /// refuses it with EOPNOTSUPP.
    pub async fn resolve_tunnel_kind(
        &self,
        mode: crate::model::TunnelMode,
    ) -> Result<TunnelKind, NetError> {
        use crate::model::TunnelMode;
        match mode {
            TunnelMode::Vxlan => Ok(TunnelKind::Vxlan),
            TunnelMode::Geneve => match self.geneve_supported().await? {
                true => Ok(TunnelKind::Geneve),
                false => Err(NetError::GeneveUnsupported),
            },
            TunnelMode::Auto => Ok(match self.geneve_supported().await? {
                true => TunnelKind::Geneve,
                false => TunnelKind::Vxlan,
            }),
        }
    }

    // ---------------------------------------------------------------- rules

    async fn rules_of(&self, v6: bool) -> Result<Vec<RuleMessage>, NetError> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        self.handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("list {} rules", family_name(v6)),
                source,
            })
    }

    /// The IPv4 and IPv6 rules whose priority is in `owned`.
    pub async fn observe_rules(&self, owned: &[u32]) -> Result<Vec<RuleSpec>, NetError> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            out.extend(
                self.rules_of(v6)
                    .await?
                    .iter()
                    .filter_map(rule_spec)
                    .filter(|r| owned.contains(&r.priority)),
            );
        }
        Ok(out)
    }

    pub async fn add_rule(&self, r: &RuleSpec) -> Result<(), NetError> {
        let mut req = self.handle.rule().add().priority(r.priority);
        if let Some((mark, mask)) = r.fwmark {
            req = req.fw_mark(mark);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(mask));
        }
        match r.action {
            RuleAction::Lookup(t) => req = req.table_id(t).action(nlrule::RuleAction::ToTable),
            RuleAction::Goto(p) => {
                req = req.action(nlrule::RuleAction::Goto);
                req.message_mut().attributes.push(RuleAttribute::Goto(p));
            }
        }
        let res = if r.v6 {
            req.v6().execute().await
        } else {
            req.v4().execute().await
        };
        res.map_err(|source| NetError::Netlink {
            what: format!("add {} rule {}", family_name(r.v6), r.priority),
            source,
        })
    }

    pub async fn del_rule(&self, r: &RuleSpec) -> Result<(), NetError> {
        let msgs = self.rules_of(r.v6).await?;
        if let Some(m) = msgs.into_iter().find(|m| rule_spec(m).as_ref() == Some(r)) {
            match self.handle.rule().del(m).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        what: format!("delete rule {}", r.priority),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    // --------------------------------------------------------------- routes

    async fn routes_of(&self, v6: bool) -> Result<Vec<RouteMessage>, NetError> {
        let filter = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        self.handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("list {} routes", family_name(v6)),
                source,
            })
    }

    /// The IPv4 and IPv6 routes of the tables in `owned`, by device name.
    pub async fn observe_routes(&self, owned: &[u32]) -> Result<Routes, NetError> {
        let names = self.link_names().await?;
        let mut out = Routes::new();
        for v6 in [false, true] {
            out.extend(
                self.routes_of(v6)
                    .await?
                    .iter()
                    .filter(|m| owned.contains(&table_of(m)))
                    .filter_map(|m| route_entry(m, &names)),
            );
        }
        Ok(out)
    }

    /// Adds or replaces (atomically, per key) one route.
    pub async fn put_route(&self, k: &RouteKey, v: &RouteValue) -> Result<(), NetError> {
        let oif = self.link_index(&v.dev).await?;
        let bad = |e: String| {
            NetError::Other(format!(
                "route {}/{} table {}: {e}",
                k.dst, k.prefix_len, k.table
            ))
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .table_id(k.table)
            .destination_prefix(k.dst, k.prefix_len)
            .map_err(|e| bad(format!("{e:?}")))?
            .output_interface(oif)
            .protocol(RouteProtocol::Static);
        b = match k.kind {
            RouteKind::Local => b.kind(RouteType::Local).scope(RouteScope::Host),
            RouteKind::Unicast if v.scope_link => b.scope(RouteScope::Link),
            RouteKind::Unicast => b.scope(RouteScope::Universe),
        };
        if let Some(gw) = v.gateway {
            b = b.gateway(gw).map_err(|e| bad(format!("{e:?}")))?;
        }
        if let Some(src) = v.src {
            b = b.pref_source(src).map_err(|e| bad(format!("{e:?}")))?;
        }
        if v.onlink {
            b = b.onlink();
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("put route {}/{} table {}", k.dst, k.prefix_len, k.table),
                source,
            })
    }

    pub async fn del_route(&self, k: &RouteKey) -> Result<(), NetError> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .table_id(k.table)
            .destination_prefix(k.dst, k.prefix_len)
            .map_err(|e| NetError::Other(format!("route {}/{}: {e:?}", k.dst, k.prefix_len)))?
            // Like `ip route del`: match any scope and protocol (the kernel compares them).
            .scope(RouteScope::NoWhere)
            .protocol(RouteProtocol::Unspec);
        if k.kind == RouteKind::Local {
            b = b.kind(RouteType::Local);
        }
        match self.handle.route().del(b.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ESRCH) || errno_of(&e) == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(NetError::Netlink {
                what: format!("delete route {}/{} table {}", k.dst, k.prefix_len, k.table),
                source,
            }),
        }
    }

    // ---------------------------------------------------------------- apply

    /// Takes the namespace from what it is to `d`, in place: tunnels first (routes need
    /// them), then new rules and routes, then stale routes and rules, then sysctls. The
    /// rules and routes owned are those with a priority in `owned_rules` / a table in
    /// `owned_tables`. Nothing is flushed: what already matches is left alone.
    pub async fn apply(
        &self,
        d: &NetDesired,
        owned_rules: &[u32],
        owned_tables: &[u32],
    ) -> Result<Changes, NetError> {
        let mut c = Changes::default();
        for t in &d.tunnels {
            if self.ensure_tunnel(t).await? {
                c.tunnels += 1;
            }
        }
        let observed_rules = self.observe_rules(owned_rules).await?;
        let (add_rules, del_rules) = diff_rules(&d.rules, &observed_rules);
        let observed_routes = self.observe_routes(owned_tables).await?;
        let (put, del) = diff_routes(&d.routes, &observed_routes);
        for r in &add_rules {
            self.add_rule(r).await?;
        }
        for (k, v) in &put {
            self.put_route(k, v).await?;
        }
        for k in &del {
            self.del_route(k).await?;
        }
        for r in &del_rules {
            self.del_rule(r).await?;
        }
        c.rules = add_rules.len() + del_rules.len();
        c.routes = put.len() + del.len();
        c.sysctls = apply_sysctls(&d.sysctls)?.len();
        Ok(c)
    }
}

/// The first UDP port from `start` that nothing in this namespace has bound (the tunnels'
/// own port counts as free when `ours` says they already use it).
pub fn free_udp_port(start: u16, ours: Option<u16>) -> Result<u16, NetError> {
    for port in start..start.saturating_add(64) {
        if Some(port) == ours {
            return Ok(port);
        }
        match std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(_) => return Ok(port),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(source) => {
                return Err(NetError::Io {
                    what: format!("probe UDP port {port}"),
                    source,
                })
            }
        }
    }
    Err(NetError::Other(format!(
        "no free UDP port in {start}..{}",
        start.saturating_add(64)
    )))
}

/// Writes the sysctls that differ; returns (key, previous value) for each one changed.
/// Keys of devices that do not exist (yet) are skipped.
pub fn apply_sysctls(s: &[crate::sysctl::Sysctl]) -> Result<Vec<(String, String)>, NetError> {
    let mut changed = Vec::new();
    for s in s {
        match sysctl::ensure(s) {
            Ok(Some(old)) => changed.push((s.key.clone(), old)),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetError::Io {
                    what: format!("sysctl {}", s.key),
                    source,
                })
            }
        }
    }
    Ok(changed)
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn family_name(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// fe80::/10: not an address a node route can name as its `src` (nor route to from another
/// table without an interface scope).
pub fn is_link_local6(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The netlink message that creates tunnel `t` (unit-tested for both kinds and families).
pub fn tunnel_message(t: &TunnelSpec) -> LinkMessage {
    match t.kind {
        TunnelKind::Geneve => {
            let b = LinkGeneve::new(t.end.name, t.end.vni);
            let b = match t.remote {
                IpAddr::V4(r) => b.remote(r),
                IpAddr::V6(r) => b.remote6(r),
            };
            b.append_info_data(InfoGeneve::Port(t.port))
                .mtu(t.mtu)
                .build()
        }
        TunnelKind::Vxlan => {
            let remote = match t.remote {
                IpAddr::V4(r) => InfoVxlan::Group(r),
                IpAddr::V6(r) => InfoVxlan::Group6(r),
            };
            LinkVxlan::new(t.end.name, t.end.vni)
                .append_info_data(remote)
                .port(t.port)
                .learning(false)
                .mtu(t.mtu)
                .build()
        }
    }
}

fn tunnel_observed(m: &LinkMessage) -> TunnelObserved {
    let mut o = TunnelObserved {
        kind: None,
        vni: None,
        port: None,
        remote: None,
        mtu: m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(v) => Some(*v),
            _ => None,
        }),
    };
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    });
    for info in infos.into_iter().flatten() {
        match info {
            LinkInfo::Kind(InfoKind::Geneve) => o.kind = Some(TunnelKind::Geneve),
            LinkInfo::Kind(InfoKind::Vxlan) => o.kind = Some(TunnelKind::Vxlan),
            LinkInfo::Data(InfoData::Geneve(nlas)) => {
                for n in nlas {
                    match n {
                        InfoGeneve::Id(v) => o.vni = Some(*v),
                        InfoGeneve::Port(p) => o.port = Some(*p),
                        InfoGeneve::Remote(r) => o.remote = Some(IpAddr::V4(*r)),
                        InfoGeneve::Remote6(r) => o.remote = Some(IpAddr::V6(*r)),
                        _ => {}
                    }
                }
            }
            LinkInfo::Data(InfoData::Vxlan(nlas)) => {
                for n in nlas {
                    match n {
                        InfoVxlan::Id(v) => o.vni = Some(*v),
                        InfoVxlan::Port(p) => o.port = Some(*p),
                        InfoVxlan::Group(r) => o.remote = Some(IpAddr::V4(*r)),
                        InfoVxlan::Group6(r) => o.remote = Some(IpAddr::V6(*r)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    o
}

fn rule_spec(m: &RuleMessage) -> Option<RuleSpec> {
    let v6 = match m.header.family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut priority = 0;
    let mut mark = None;
    let mut mask = None;
    let mut table = u32::from(m.header.table);
    let mut goto = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Goto(g) => goto = Some(*g),
            _ => {}
        }
    }
    let action = match m.header.action {
        nlrule::RuleAction::ToTable => RuleAction::Lookup(table),
        nlrule::RuleAction::Goto => RuleAction::Goto(goto?),
        _ => return None,
    };
    let fwmark = mark.map(|m| (m, mask.unwrap_or(u32::MAX)));
    Some(RuleSpec {
        priority,
        fwmark,
        action,
        v6,
    })
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_entry(m: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<(RouteKey, RouteValue)> {
    let kind = match m.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Local => RouteKind::Local,
        _ => return None,
    };
    let mut dst: IpAddr = match m.header.address_family {
        AddressFamily::Inet => Ipv4Addr::UNSPECIFIED.into(),
        AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    let mut v = RouteValue {
        dev: String::new(),
        gateway: None,
        src: None,
        scope_link: m.header.scope == RouteScope::Link,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = (*d).into(),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = (*d).into(),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => v.gateway = Some((*g).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => v.gateway = Some((*g).into()),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => v.src = Some((*s).into()),
            RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => v.src = Some((*s).into()),
            RouteAttribute::Oif(i) => v.dev = names.get(i).cloned().unwrap_or_default(),
            _ => {}
        }
    }
    Some((
        RouteKey {
            table: table_of(m),
            dst,
            prefix_len: m.header.destination_prefix_length,
            kind,
        },
        v,
    ))
}

/// Every owned rule, route and the given links removed; for cleanup. Absent things are fine.
pub async fn remove_all(
    nl: &Netlink,
    links: &[&str],
    owned_rules: &[u32],
    owned_tables: &[u32],
) -> Result<Changes, NetError> {
    let empty = NetDesired {
        tunnels: Vec::new(),
        rules: BTreeSet::new(),
        routes: Routes::new(),
        sysctls: Vec::new(),
    };
    let mut c = nl.apply(&empty, owned_rules, owned_tables).await?;
    for l in links {
        if nl.delete_link(l).await? {
            c.tunnels += 1;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts;
    use netlink_packet_core::Emitable;

    fn spec(kind: TunnelKind) -> TunnelSpec {
        TunnelSpec {
            end: consts::ISTIOIN,
            kind,
            port: 6081,
            remote: Ipv4Addr::new(10, 244, 1, 2).into(),
            mtu: 1450,
            v6: false,
        }
    }

    fn spec6(kind: TunnelKind) -> TunnelSpec {
        TunnelSpec {
            remote: "fd00:10:244:1::2".parse().unwrap(),
            v6: true,
            ..spec(kind)
        }
    }

    #[test]
    fn an_ipv6_underlay_is_remote6_for_geneve_and_group6_for_vxlan() {
        let want: IpAddr = "fd00:10:244:1::2".parse().unwrap();
        for (kind, attr) in [(TunnelKind::Geneve, 7u16), (TunnelKind::Vxlan, 16u16)] {
            let m = tunnel_message(&spec6(kind));
            let o = tunnel_observed(&m);
            assert_eq!(
                (o.kind, o.remote, o.vni),
                (Some(kind), Some(want), Some(1000))
            );
            // IFLA_GENEVE_REMOTE6 (7) / IFLA_VXLAN_GROUP6 (16): 4 bytes of header + 16.
            let mut buf = vec![0u8; m.buffer_len()];
            m.emit(&mut buf);
            let [lo, hi] = attr.to_le_bytes();
            let mut nla = vec![20, 0, lo, hi];
            nla.extend_from_slice(&"fd00:10:244:1::2".parse::<Ipv6Addr>().unwrap().octets());
            assert!(buf.windows(20).any(|w| w == nla.as_slice()), "{kind:?}");
        }
    }

    #[test]
    fn ipv6_rules_and_routes_are_read_back_with_their_family() {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.action = nlrule::RuleAction::ToTable;
        m.attributes = vec![RuleAttribute::Priority(103), RuleAttribute::Table(100)];
        assert_eq!(
            rule_spec(&m),
            Some(RuleSpec {
                priority: 103,
                fwmark: None,
                action: RuleAction::Lookup(100),
                v6: true,
            })
        );
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet6;
        r.header.kind = RouteType::Unicast;
        r.header.destination_prefix_length = 128;
        let pod: Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
        r.attributes = vec![
            RouteAttribute::Table(100),
            RouteAttribute::Destination(RouteAddress::Inet6(pod)),
            RouteAttribute::Gateway(RouteAddress::Inet6(consts::ISTIOIN.peer6)),
            RouteAttribute::Oif(7),
        ];
        let names = [(7, "istioin".to_string())].into();
        let (k, v) = route_entry(&r, &names).unwrap();
        assert_eq!((k.table, k.dst, k.prefix_len), (100, IpAddr::V6(pod), 128));
        assert_eq!(
            (v.dev.as_str(), v.gateway),
            ("istioin", Some(consts::ISTIOIN.peer6.into()))
        );
    }

    #[test]
    fn geneve_message_carries_vni_remote_port_and_mtu() {
        let m = tunnel_message(&spec(TunnelKind::Geneve));
        let o = tunnel_observed(&m);
        assert_eq!(
            o,
            TunnelObserved {
                kind: Some(TunnelKind::Geneve),
                vni: Some(1000),
                port: Some(6081),
                remote: Some(Ipv4Addr::new(10, 244, 1, 2).into()),
                mtu: Some(1450),
            }
        );
        assert_eq!(link_name(&m).as_deref(), Some("istioin"));
        // The wire form holds the kind string and the Geneve attributes.
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        assert!(buf.windows(6).any(|w| w == b"geneve"));
        // IFLA_GENEVE_PORT (5) is big-endian 6081 = 0x17c1.
        assert!(buf.windows(6).any(|w| w == [6, 0, 5, 0, 0x17, 0xc1]));
    }

    #[test]
    fn vxlan_message_has_the_same_vni_remote_and_port() {
        let m = tunnel_message(&spec(TunnelKind::Vxlan));
        let o = tunnel_observed(&m);
        assert_eq!(o.kind, Some(TunnelKind::Vxlan));
        assert_eq!(
            (o.vni, o.port, o.remote),
            (
                Some(1000),
                Some(6081),
                Some(Ipv4Addr::new(10, 244, 1, 2).into())
            )
        );
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        assert!(buf.windows(5).any(|w| w == b"vxlan"));
    }

    #[test]
    fn rule_message_round_trip_of_goto_and_lookup() {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = nlrule::RuleAction::Goto;
        m.attributes = vec![
            RuleAttribute::Priority(100),
            RuleAttribute::FwMark(0x200),
            RuleAttribute::FwMask(0x200),
            RuleAttribute::Goto(32766),
        ];
        assert_eq!(
            rule_spec(&m),
            Some(RuleSpec {
                priority: 100,
                fwmark: Some((0x200, 0x200)),
                action: RuleAction::Goto(32766),
                v6: false,
            })
        );
    }
}
