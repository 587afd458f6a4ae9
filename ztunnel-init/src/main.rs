//! ztunnel-init: prepares the ztunnel pod's netns (SPEC §3), run inside it as an init
//! container: `pistioin`/`pistioout` toward the node, rules 20000/20003, tables 100–102,
//! rp_filter, and the TPROXY rules to 15001/15006/15008. Idempotent.

use std::path::PathBuf;

use ambient_net::consts::zt_rule;
use ambient_net::model::{self, TunnelChoice, TunnelMode};
use ambient_net::nft::{self, ZtunnelRules};
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
    /// The pod's interface toward the node.
    #[arg(long, default_value = "eth0")]
    pod_iface: String,
    /// Remove what ztunnel-init created instead.
    #[arg(long)]
    cleanup: bool,
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
        nft::delete_ztunnel_table()?;
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
    let own_ip = nl
        .link_ipv4(index)
        .await?
        .ok_or_else(|| anyhow!("{} has no IPv4 address", cli.pod_iface))?;
    // The tunnels' remote is the address this pod reaches the node by: its default gateway.
    let (node_ip, _) = nl
        .default_gateway()
        .await?
        .ok_or_else(|| anyhow!("no default route: cannot tell the node's address"))?;
    let desired = model::ztunnel_desired(choice, node_ip, &cli.pod_iface, mtu);
    let changes = nl.apply(&desired, &zt_rule::ALL, &tables).await?;
    let nft_changed = nft::reconcile_ztunnel(&ZtunnelRules {
        ztunnel_ip: own_ip,
        pod_iface: cli.pod_iface.clone(),
    })?;
    info!(?choice, %node_ip, %own_ip, ?changes, nft_changed, "ztunnel netns ready");
    Ok(())
}
