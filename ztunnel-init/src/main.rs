//! ztunnel-init: prepares the ztunnel pod's netns (SPEC §3), run inside it as an init
//! container: `pistioin`/`pistioout` toward the node, rules 20000/20003, tables 100–102,
//! rp_filter, and the TPROXY rules to 15001/15006/15008. Idempotent. A pod with an IPv6
//! address gets the same in IPv6 (`ip -6` rules and tables, `local ::/0 dev lo`, `table ip6
//! ztunnel`) wherever its node can be reached over IPv6 too.

use std::path::PathBuf;

use ambient_net::consts::zt_rule;
use ambient_net::firewall::{FirewallKind, FirewallMode};
use ambient_net::model::{self, DualAddr, TunnelChoice, TunnelMode};
use ambient_net::nft::{SynLimit, ZtunnelRules};
use ambient_net::nl::{self, Netlink};
use anyhow::{anyhow, Context};
use clap::Parser;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "ztunnel-init",
    version,
    about = "Prepare the ztunnel pod's network namespace"
)]
struct Cli {
    /// The node agent's tunnel choice (its `tunnel.json`); overrides --tunnel/--tunnel-port.
    #[arg(long)]
    tunnel_state: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    tunnel: TunnelMode,
    #[arg(long, default_value_t = ambient_net::consts::TUNNEL_PORT)]
    tunnel_port: u16,
    /// The TPROXY rules' backend. auto: nftables when the kernel and `nft` have it, else
    /// iptables. The ztunnel netns is its own, so it need not match the node agent's.
    #[arg(long, default_value = "auto")]
    firewall: FirewallMode,
    /// The pod's interface toward the node.
    #[arg(long, default_value = "eth0")]
    pod_iface: String,
    /// New connections per second one source address may open into ztunnel's listeners
    /// (15001/15006/15008) before its SYNs are dropped, ahead of conntrack; 0: no limit.
    /// One pod's connection flood then cannot starve the others' connections.
    #[arg(long, default_value_t = ambient_net::consts::syn_limit::PER_SECOND)]
    new_connections_per_source: u32,
    /// New connections a source may open at once beyond that rate.
    #[arg(long, default_value_t = ambient_net::consts::syn_limit::BURST)]
    new_connections_burst: u32,
    /// Remove what ztunnel-init created instead.
    #[arg(long)]
    cleanup: bool,
}

impl Cli {
    fn syn_limit(&self) -> Option<SynLimit> {
        SynLimit::new(self.new_connections_per_source, self.new_connections_burst)
    }
}

fn main() -> anyhow::Result<()> {
    ambient_net::logging::init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let nl = Netlink::current()?;
    let tables = [
        zt_rule::TABLE_LOCAL,
        zt_rule::TABLE_OUTBOUND,
        zt_rule::TABLE_INBOUND,
    ];
    if cli.cleanup {
        let links = [
            ambient_net::consts::PISTIOIN.name,
            ambient_net::consts::PISTIOOUT.name,
        ];
        nl::remove_all(&nl, &links, &zt_rule::ALL, &tables).await?;
        // Both backends: whichever made the rules (an absent binary has nothing to remove).
        for k in FirewallKind::ALL {
            match k.driver().cleanup_ztunnel() {
                Err(e) if e.is_missing() => {}
                r => r?,
            }
        }
        info!("ztunnel netns cleaned up");
        return Ok(());
    }
    let choice = match &cli.tunnel_state {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            serde_json::from_str::<TunnelChoice>(&text)
                .with_context(|| format!("parse {}", p.display()))?
        }
        None => TunnelChoice {
            kind: nl.resolve_tunnel_kind(cli.tunnel).await?,
            port: cli.tunnel_port,
        },
    };
    let index = nl.link_index(&cli.pod_iface).await?;
    let (_, mtu) = nl
        .link_name_mtu(index)
        .await?
        .ok_or_else(|| anyhow!("{} vanished", cli.pod_iface))?;
    // The pod's own addresses, and the node's (its default gateways): the tunnels' remote is
    // the IPv4 one when the pod has IPv4, else the IPv6 one.
    let own = DualAddr {
        v4: nl.link_ipv4(index).await?,
        v6: nl.link_ipv6(index).await?,
    };
    let mut node = DualAddr::default();
    if own.v4.is_some() {
        node.v4 = nl.default_gateway().await?.map(|(g, _)| g);
    }
    if own.v6.is_some() {
        // A link-local gateway cannot be routed to from the tunnels' tables: IPv6 is then
        // left out (as the node agent does).
        node.v6 = nl
            .default_gateway6()
            .await?
            .map(|(g, _)| g)
            .filter(|g| !nl::is_link_local6(g));
    }
    let own_ip = own
        .primary()
        .ok_or_else(|| anyhow!("{} has no IP address", cli.pod_iface))?;
    if node.get(own_ip.is_ipv6()).is_none() {
        return Err(anyhow!(
            "no default route for {own_ip}: cannot tell the node's address"
        ));
    }
    // Only the families both ends have.
    let own = DualAddr {
        v4: own.v4.filter(|_| node.v4.is_some()),
        v6: own.v6.filter(|_| node.v6.is_some()),
    };
    let node = DualAddr {
        v4: node.v4.filter(|_| own.v4.is_some()),
        v6: node.v6.filter(|_| own.v6.is_some()),
    };
    let desired = model::ztunnel_desired(choice, node, &cli.pod_iface, mtu);
    let changes = nl.apply(&desired, &zt_rule::ALL, &tables).await?;
    let fw = cli.firewall.resolve().driver();
    let nft_changed = fw.reconcile_ztunnel(&ZtunnelRules {
        ztunnel_ip: own_ip,
        ztunnel_ip6: own.v6.filter(|_| own_ip.is_ipv4()),
        pod_iface: cli.pod_iface.clone(),
        syn_limit: cli.syn_limit(),
    })?;
    info!(
        ?choice,
        ?node,
        ?own,
        ?changes,
        firewall = fw.name(),
        syn_limit = ?cli.syn_limit(),
        nft_changed,
        "ztunnel netns ready"
    );
    Ok(())
}
