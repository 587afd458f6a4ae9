//! Network namespaces: run code inside one, spawn a process inside one, and (for the lab)
//! create and delete named namespaces under `/run/netns` the way `ip netns` does.
//!
//! `setns(2)` changes only the calling thread, so work for another namespace runs on a
//! short-lived thread of its own; sockets it opens (netlink included) stay bound to that
//! namespace after the thread ends.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live (shared with iproute2's `ip netns`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn to_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`.
pub fn run_in<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", netns.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(to_io(e).kind(), format!("setns {}: {e}", netns.display()))
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread in netns panicked"))?
    })
}

/// Makes `cmd` start inside the network namespace at `netns`.
pub fn command_in(cmd: &mut Command, netns: &Path) -> io::Result<()> {
    let ns = File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", netns.display())))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, and keeps `ns`
    // (opened before fork) alive for the child.
    unsafe {
        cmd.pre_exec(move || setns(&ns, CloneFlags::CLONE_NEWNET).map_err(to_io));
    }
    Ok(())
}

/// Creates the named namespace `/run/netns/<name>`; fails if it exists.
pub fn create_named(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad netns name {name:?}"),
        ));
    }
    std::fs::create_dir_all(NETNS_RUN_DIR)?;
    let path = named_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(to_io)?;
        let tid = nix::unistd::gettid();
        let own = format!("/proc/self/task/{tid}/ns/net");
        mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(to_io)
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(io::Error::new(
            e.kind(),
            format!("bind netns {}: {e}", path.display()),
        ));
    }
    Ok(path)
}

/// Deletes a named namespace; succeeds when it is already gone.
pub fn delete_named(name: &str) -> io::Result<()> {
    let path = named_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::ENOENT) | Err(nix::Error::EINVAL) => {}
        Err(e) => return Err(to_io(e)),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Lists the named namespaces.
pub fn list_named() -> io::Result<Vec<String>> {
    match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(dir) => Ok(dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// True when `path` names the same namespace as the calling thread's.
pub fn is_current(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(path)?;
    let b = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}
