//! `ambient-agent install-cni`: puts the `ambient-cni` plugin into the node's CNI chain and, with
//! `--watch`, keeps it there.
//!
//! **Which file.** The primary config is chosen as kubelet (and CRI-O) choose the network: the
//! files of the config dir whose extension is `.conf`, `.conflist` or `.json` (libcni's
//! `ConfFiles`; directories skipped), in byte-wise lexical order; the first one that loads
//! (`.conflist`: a string `name` and a non-empty `plugins` list whose entries all have a `type`;
//! any other extension: a single network config with a `type`) is the primary. A file that does
//! not load is skipped with a warning naming it and why, as kubelet and CRI-O skip it (containerd
//! instead refuses the whole directory until it is fixed; we cannot fix that and do not try).
//! While no file exists the installer waits and says so; when files exist but none loads, a
//! one-shot install fails naming every file and nothing is written, and `--watch` keeps waiting.
//!
//! **The edit.** Our entry goes at the end of the primary's `plugins` (an existing `ambient-cni`
//! entry is replaced where it stands, so runs are idempotent), spliced into the text so every
//! other byte of the file stays as it was. A single-plugin `.conf`/`.json` becomes a `.conflist`
//! of the same base name (`name` and `cniVersion` kept, the original object as first plugin);
//! the new file is written before the old one is removed, so the runtime never sees no config.
//! Our entry then records the conversion under `_ambientConvertedFrom` (the original file name
//! and its exact text). Nothing is written when nothing changes; every write is atomic (temp
//! file in the same dir, fsync, rename) and keeps the file's mode and owner.
//!
//! **Repair** (`--watch`): inotify on the config and bin dirs; a change is acted on after 50 ms
//! of quiet (at most 300 ms), plus a full check every 10 s. A rewritten primary gets our entry
//! back; a new file that sorts first gets the entry and the old file loses it.
//!
//! **Uninstall** (`--uninstall`, or `--watch --uninstall-on-exit` on SIGTERM): our entry is
//! removed from every config file, which restores the inserted bytes exactly; a `.conflist` we
//! converted becomes its original `.conf` again byte for byte, unless someone changed the list
//! since (then it stays a `.conflist`, minus our entry). The binary is removed.

pub(crate) mod chain;
mod files;
mod span;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use chain::{Entry, Invalid, Kind, Parsed, Removed, PLUGIN_TYPE};

/// Full check interval of `--watch`, on top of inotify.
const RESYNC: Duration = Duration::from_secs(10);
/// A burst of events is acted on after this much quiet…
const QUIET: Duration = Duration::from_millis(50);
/// …or after this long, whichever comes first.
const MAX_DELAY: Duration = Duration::from_millis(300);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node's CNI binary directory (hostPath).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI config directory (hostPath).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The ambient-cni binary to install [default: ambient-cni next to this executable].
    #[arg(long)]
    pub plugin_bin: Option<PathBuf>,
    /// Our entry in the chain, a JSON object of the plugin's options (agentSocket, logFile,
    /// logLevel, failOpen, excludedNamespaces, timeoutMs); "type" is added when missing.
    /// [default: {"type":"ambient-cni","agentSocket":"/var/run/ambient/agent.sock"}]
    #[arg(long)]
    pub plugin_config: Option<String>,
    /// Keep running and repair the chain when the config dir changes.
    #[arg(long, conflicts_with = "uninstall")]
    pub watch: bool,
    /// With --watch: uninstall on SIGTERM/SIGINT (the DaemonSet's shutdown path).
    #[arg(long, requires = "watch")]
    pub uninstall_on_exit: bool,
    /// Remove our entry from every config file (restoring converted .conf files) and the binary.
    #[arg(long)]
    pub uninstall: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let entry = match &args.plugin_config {
        Some(text) => Entry::from_json(text).map_err(|e| anyhow!("--plugin-config: {e}"))?,
        None => Entry::default_entry(),
    };
    let plugin_bin = match &args.plugin_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locate this executable")?
            .with_file_name(PLUGIN_TYPE),
    };
    let inst = Installer {
        bin_dir: args.cni_bin_dir.clone(),
        conf_dir: args.cni_conf_dir.clone(),
        plugin_bin,
        entry,
    };
    if args.uninstall {
        return inst.uninstall();
    }
    if !inst.plugin_bin.is_file() {
        bail!(
            "plugin binary {} not found (set --plugin-bin)",
            inst.plugin_bin.display()
        );
    }
    for d in [&inst.conf_dir, &inst.bin_dir] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let mut watcher = Watcher::new(vec![inst.conf_dir.clone(), inst.bin_dir.clone()])?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut last_said = String::new();
    loop {
        match inst.reconcile() {
            Ok(outcome @ Outcome::Chained { .. }) if !args.watch => {
                info!("{}", outcome.say(&inst.conf_dir));
                return Ok(());
            }
            Ok(Outcome::Unusable(bad)) if !args.watch => {
                bail!(
                    "no usable CNI network config in {}, nothing written: {}",
                    inst.conf_dir.display(),
                    describe(&bad)
                )
            }
            Ok(outcome) => {
                let said = outcome.say(&inst.conf_dir);
                if said != last_said {
                    match &outcome {
                        Outcome::Chained { .. } => info!("{said}"),
                        Outcome::NoConfig => info!("{said}"),
                        Outcome::Unusable(_) => error!("{said}"),
                    }
                    last_said = said;
                }
            }
            Err(e) if !args.watch => return Err(e),
            Err(e) => {
                error!("{e:#}");
                last_said.clear();
            }
        }
        tokio::select! {
            r = watcher.changed() => r?,
            _ = tokio::time::sleep(RESYNC) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if !args.watch {
        bail!("stopped before a CNI network config appeared");
    }
    if args.uninstall_on_exit {
        info!("stopping: uninstalling");
        inst.uninstall()
    } else {
        info!("stopping; the chain entry and the binary stay in place");
        Ok(())
    }
}

fn describe(bad: &[(String, Invalid)]) -> String {
    bad.iter()
        .map(|(n, e)| format!("{n}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What one pass found.
#[derive(Debug)]
enum Outcome {
    /// Our entry is in `primary` (which may have just been written); `skipped` files sorted
    /// before it but do not load.
    Chained {
        primary: String,
        skipped: Vec<(String, Invalid)>,
    },
    /// The config dir has no candidate file yet.
    NoConfig,
    /// Candidate files exist but none loads.
    Unusable(Vec<(String, Invalid)>),
}

impl Outcome {
    fn say(&self, dir: &Path) -> String {
        match self {
            Outcome::Chained { primary, skipped } if skipped.is_empty() => {
                format!("chained into {primary}")
            }
            Outcome::Chained { primary, skipped } => format!(
                "chained into {primary}; skipped files that do not load (kubelet and CRI-O skip \
                 them too): {}",
                describe(skipped)
            ),
            Outcome::NoConfig => format!(
                "waiting for the primary CNI's network config in {} (*.conf, *.conflist, *.json)",
                dir.display()
            ),
            Outcome::Unusable(bad) => format!(
                "waiting for a usable CNI network config in {}: {}",
                dir.display(),
                describe(bad)
            ),
        }
    }
}

/// One config file as libcni lists it.
struct Candidate {
    name: String,
    path: PathBuf,
    text: String,
    parsed: Result<Parsed, Invalid>,
}

struct Installer {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    plugin_bin: PathBuf,
    entry: Entry,
}

impl Installer {
    /// The candidate files in the order libcni sorts them.
    fn scan(&self) -> anyhow::Result<Vec<Candidate>> {
        let mut names = BTreeMap::new();
        let rd = fs::read_dir(&self.conf_dir)
            .with_context(|| format!("read {}", self.conf_dir.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("read {}", self.conf_dir.display()))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if let Some(kind) = chain::kind_of(&name) {
                names.insert(name, kind);
            }
        }
        let mut out = Vec::new();
        for (name, kind) in names {
            let path = self.conf_dir.join(&name);
            let (text, parsed) = match fs::metadata(&path) {
                Ok(m) if m.is_dir() => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                _ => match fs::read(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => (
                        String::new(),
                        Err(Invalid::Shape(format!("cannot read: {e}"))),
                    ),
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(t) => {
                            let p = chain::parse(kind, &t);
                            (t, p)
                        }
                        Err(_) => (String::new(), Err(Invalid::Json("not UTF-8".into()))),
                    },
                },
            };
            out.push(Candidate {
                name,
                path,
                text,
                parsed,
            });
        }
        Ok(out)
    }

    /// One pass: find the primary, put the binary and our entry in place, take the entry out of
    /// every other file. Writes only what differs.
    fn reconcile(&self) -> anyhow::Result<Outcome> {
        let cands = self.scan()?;
        if cands.is_empty() {
            return Ok(Outcome::NoConfig);
        }
        let Some(first) = cands.iter().position(|c| c.parsed.is_ok()) else {
            return Ok(Outcome::Unusable(invalid_list(&cands)));
        };
        let skipped = invalid_list(&cands[..first]);
        let dest = self.bin_dir.join(PLUGIN_TYPE);
        if files::install_binary(&self.plugin_bin, &dest)
            .with_context(|| format!("install {}", dest.display()))?
        {
            info!(from = %self.plugin_bin.display(), "installed {}", dest.display());
        }
        let c = &cands[first];
        let primary = match c.parsed.as_ref().map(|p| p.kind) {
            Ok(Kind::List) => {
                if let Some(new) = chain::with_entry(&c.text, &self.entry)
                    .map_err(|e| anyhow!("{}: {e}", c.path.display()))?
                {
                    let target = write_target(&c.path);
                    files::atomic_write(&target, new.as_bytes(), None)
                        .with_context(|| format!("write {}", target.display()))?;
                    info!("added the {PLUGIN_TYPE} entry to {}", c.path.display());
                }
                c.name.clone()
            }
            _ => self.convert(c)?,
        };
        // Anything else that carries our entry (the previous primary) gives it back.
        for other in self.scan()? {
            if other.name != primary && other.parsed.as_ref().is_ok_and(|p| p.has_entry()) {
                self.remove_entry(&other)?;
            }
        }
        Ok(Outcome::Chained { primary, skipped })
    }

    /// Turns the single-plugin primary into `<base>.conflist` with our entry; returns its name.
    fn convert(&self, c: &Candidate) -> anyhow::Result<String> {
        let stem = &c.name[..c.name.len() - chain::go_ext(&c.name).len()];
        let name = format!("{stem}.conflist");
        let target = self.conf_dir.join(&name);
        if target.exists() {
            // Only a list we made from this very file may be overwritten.
            let ours = fs::read_to_string(&target)
                .ok()
                .and_then(|t| chain::parse(Kind::List, &t).ok())
                .and_then(|p| p.converted_from())
                .is_some_and(|f| f == c.name);
            if !ours {
                bail!(
                    "cannot turn {} into a .conflist: {} exists and was not made by this \
                     installer; merge the two by hand",
                    c.path.display(),
                    target.display()
                );
            }
        }
        let list = chain::convert(&c.name, &c.text, &self.entry)
            .map_err(|e| anyhow!("{}: {e}", c.path.display()))?;
        let owner = files::Owner::of(&c.path).ok();
        files::atomic_write(&target, list.as_bytes(), owner)
            .with_context(|| format!("write {}", target.display()))?;
        files::remove(&c.path).with_context(|| format!("remove {}", c.path.display()))?;
        info!(
            "turned {} into {} with the {PLUGIN_TYPE} entry",
            c.path.display(),
            target.display()
        );
        Ok(name)
    }

    /// Takes our entry out of one file (restoring a `.conf` we converted).
    fn remove_entry(&self, c: &Candidate) -> anyhow::Result<()> {
        let removed =
            chain::without_entry(&c.text).map_err(|e| anyhow!("{}: {e}", c.path.display()))?;
        match removed {
            None => {}
            Some(Removed::Rewrite(text)) => {
                let target = write_target(&c.path);
                files::atomic_write(&target, text.as_bytes(), None)
                    .with_context(|| format!("write {}", target.display()))?;
                info!("removed the {PLUGIN_TYPE} entry from {}", c.path.display());
            }
            Some(Removed::Restore { file, content }) => {
                let orig = self.conf_dir.join(&file);
                match fs::read(&orig) {
                    Ok(b) if b == content.as_bytes() => {}
                    Ok(_) => warn!(
                        "{} was rewritten since we converted it; dropping our copy {}",
                        orig.display(),
                        c.path.display()
                    ),
                    Err(_) => {
                        let owner = files::Owner::of(&c.path).ok();
                        files::atomic_write(&orig, content.as_bytes(), owner)
                            .with_context(|| format!("write {}", orig.display()))?;
                    }
                }
                files::remove(&c.path).with_context(|| format!("remove {}", c.path.display()))?;
                info!(
                    "restored {} and removed {}",
                    orig.display(),
                    c.path.display()
                );
            }
        }
        Ok(())
    }

    fn uninstall(&self) -> anyhow::Result<()> {
        if self.conf_dir.is_dir() {
            for c in self.scan()? {
                if c.parsed.as_ref().is_ok_and(|p| p.has_entry()) {
                    self.remove_entry(&c)?;
                }
            }
        }
        let bin = self.bin_dir.join(PLUGIN_TYPE);
        if files::remove(&bin).with_context(|| format!("remove {}", bin.display()))? {
            info!("removed {}", bin.display());
        }
        info!("uninstalled");
        Ok(())
    }
}

fn invalid_list(cands: &[Candidate]) -> Vec<(String, Invalid)> {
    cands
        .iter()
        .filter_map(|c| c.parsed.as_ref().err().map(|e| (c.name.clone(), e.clone())))
        .collect()
}

/// Where to write a config file: a symlink's target (so the link stays), else the file.
fn write_target(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).unwrap_or(path.into()),
        _ => path.to_path_buf(),
    }
}

/// inotify on a few directories; [`Watcher::changed`] returns after a burst of events settles.
struct Watcher {
    dirs: Vec<PathBuf>,
    stream: inotify::EventStream<Vec<u8>>,
}

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

impl Watcher {
    fn new(dirs: Vec<PathBuf>) -> anyhow::Result<Watcher> {
        let ino = Inotify::init().context("inotify_init")?;
        for d in &dirs {
            ino.watches()
                .add(d, mask())
                .with_context(|| format!("watch {}", d.display()))?;
        }
        let stream = ino
            .into_event_stream(vec![0u8; 16 * 1024])
            .context("inotify stream")?;
        Ok(Watcher { dirs, stream })
    }

    async fn changed(&mut self) -> anyhow::Result<()> {
        let mut lost = false;
        let mut note = |ev: io::Result<inotify::Event<std::ffi::OsString>>| -> anyhow::Result<()> {
            let ev = ev.context("read inotify events")?;
            if ev.mask.intersects(
                inotify::EventMask::IGNORED
                    | inotify::EventMask::DELETE_SELF
                    | inotify::EventMask::MOVE_SELF,
            ) {
                lost = true;
            }
            Ok(())
        };
        match self.stream.next().await {
            Some(ev) => note(ev)?,
            None => bail!("inotify stream ended"),
        }
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            let quiet = tokio::time::sleep(QUIET);
            tokio::select! {
                ev = self.stream.next() => match ev {
                    Some(ev) => note(ev)?,
                    None => bail!("inotify stream ended"),
                },
                _ = quiet => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if lost {
            // A watched directory went away (or was replaced): watch it again.
            for d in &self.dirs {
                fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                self.stream
                    .watches()
                    .add(d, mask())
                    .with_context(|| format!("watch {}", d.display()))?;
            }
            warn!("a watched directory was removed or replaced; watching it again");
        }
        Ok(())
    }
}
