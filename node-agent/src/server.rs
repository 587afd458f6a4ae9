//! The CNI-facing unix socket (root-only): one JSON request line, one JSON reply line.
//!
//! Root-only twice over: the socket is mode 0600 in a 0700 directory, and every connection's
//! peer credentials (SO_PEERCRED) are checked: only uid 0 and the agent's own uid (the
//! socket's owner) are served. Any other caller (the file mode loosened by hand, a socket
//! passed into a container) gets an error reply and is never handed to the node; each refused
//! uid is logged once, not once per call.

use std::collections::HashSet;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ambient_net::proto::{Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::node::Node;

/// How many distinct refused uids are remembered (and logged); later ones are refused silently.
const MAX_LOGGED_REFUSALS: usize = 256;

/// The longest request line accepted (a GC list for thousands of pods fits).
const MAX_REQUEST: usize = 4 << 20;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A socket file left by a previous (killed) agent would make bind fail.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, node: Arc<Mutex<Node>>) {
    serve_with(listener, move |req| {
        let node = node.clone();
        async move { node.lock().await.handle(req).await }
    })
    .await
}

/// The accept loop with any request handler (the node in production, a stub in tests).
pub async fn serve_with<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send,
{
    let gate = Arc::new(PeerGate::new(nix::unistd::geteuid().as_raw()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &gate, handler).await {
                        warn!("CNI connection: {e:#}");
                    }
                });
            }
            Err(e) => warn!("accept on the CNI socket: {e}"),
        }
    }
}

/// Who may call: uid 0 and the socket's owner; remembers which refused uids were logged.
struct PeerGate {
    owner: u32,
    logged: std::sync::Mutex<HashSet<Option<u32>>>,
}

impl PeerGate {
    fn new(owner: u32) -> Self {
        PeerGate {
            owner,
            logged: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// `Ok` for an allowed caller, else the refusal sent back (logged once per uid).
    fn check(&self, stream: &UnixStream) -> Result<(), Reply> {
        let uid = stream
            .peer_cred()
            .map(|c| c.uid())
            .map_err(|e| e.to_string());
        self.decide(uid).map_err(|(why, first)| {
            if first {
                warn!(
                    caller = %why,
                    "refused a CNI socket caller: only root and the agent's own uid are served (logged once per uid)"
                );
            }
            Reply::error(
                format!("permission denied: the ambient agent serves root only, not {why}"),
                false,
            )
        })
    }

    /// The verdict for a caller's uid: `Err((who, first time))` when refused.
    fn decide(&self, uid: Result<u32, String>) -> Result<(), (String, bool)> {
        let (key, why) = match uid {
            Ok(uid) if uid == 0 || uid == self.owner => return Ok(()),
            Ok(uid) => (Some(uid), format!("uid {uid}")),
            Err(e) => (None, format!("a caller of unknown uid ({e})")),
        };
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let first = logged.len() < MAX_LOGGED_REFUSALS && logged.insert(key);
        Err((why, first))
    }
}

async fn handle<H, F>(stream: UnixStream, gate: &PeerGate, handler: H) -> anyhow::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Reply>,
{
    let refused = gate.check(&stream).err();
    let (r, mut w) = stream.into_split();
    // The request line is read either way, so that a refused client that writes first still
    // gets the refusal instead of a broken pipe.
    let mut line = String::new();
    let n = BufReader::new(r.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let reply = match refused {
        // Never parsed nor passed on: a refused caller reaches nothing of the node.
        Some(reply) => reply,
        None if n == 0 => return Ok(()),
        None => match Request::decode(&line) {
            Ok(req) => {
                debug!(?req, "CNI request");
                handler(req).await
            }
            Err(e) => Reply::error(format!("bad request: {e}"), false),
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Set in the re-executed test binary: connect to this socket, send one request, print
    /// the reply line (or the connect error) on stdout.
    const CLIENT_ENV: &str = "AMBIENT_AGENT_TEST_SOCKET_CLIENT";
    const NOBODY: u32 = 65534;

    /// Not a test of its own: the client side of `non_root_callers_are_refused`, run as
    /// another uid. Without the variable it does nothing.
    #[test]
    fn socket_client_helper() {
        let Ok(path) = std::env::var(CLIENT_ENV) else {
            return;
        };
        let line = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(mut s) => {
                s.write_all(b"{\"op\":\"status\"}\n").unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&s).read_line(&mut line).unwrap();
                line
            }
            Err(e) => format!("connect error: {e}"),
        };
        println!("REPLY {}", line.trim_end());
    }

    /// Runs the helper as `uid` (root only can) and returns its reply line.
    fn call_as(uid: u32, socket: &Path) -> String {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "server::tests::socket_client_helper",
                "--nocapture",
            ])
            .env(CLIENT_ENV, socket)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("REPLY "))
            .unwrap_or_else(|| {
                panic!(
                    "helper said nothing: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_root_callers_are_refused_root_is_served() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (to run a client as another uid)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock/agent.sock");
        let listener = bind(&socket).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(serve_with(listener, move |_req| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Reply::Ok {
                    enrolled: false,
                    reason: "served".into(),
                }
            }
        }));
        let call = |uid| {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || call_as(uid, &socket))
        };

        // Root is served.
        let reply = call(0).await.unwrap();
        assert!(reply.contains("served"), "{reply}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // As created (0600 in a 0700 directory) the socket cannot even be reached by nobody.
        let reply = call(NOBODY).await.unwrap();
        assert!(
            reply.contains("connect error") && reply.contains("ermission denied"),
            "{reply}"
        );

        // Loosened by hand, the peer-credential check still refuses, without calling the node.
        let perm = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        perm(socket.parent().unwrap(), 0o755).unwrap();
        perm(&socket, 0o666).unwrap();
        for _ in 0..3 {
            let reply = call(NOBODY).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(v["result"], "error", "{reply}");
            let msg = v["message"].as_str().unwrap();
            assert!(
                msg.contains("permission denied") && msg.contains("uid 65534"),
                "{msg}"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a refused caller reached the handler"
        );
        // Root still is served.
        assert!(call(0).await.unwrap().contains("served"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn refusals_are_logged_once_per_uid() {
        let gate = PeerGate::new(1000);
        assert_eq!(gate.decide(Ok(0)), Ok(()));
        assert_eq!(gate.decide(Ok(1000)), Ok(()), "the socket's owner");
        assert_eq!(gate.decide(Ok(33)), Err(("uid 33".into(), true)));
        assert_eq!(gate.decide(Ok(33)), Err(("uid 33".into(), false)));
        assert_eq!(gate.decide(Ok(34)), Err(("uid 34".into(), true)));
        let (why, first) = gate.decide(Err("EINVAL".into())).unwrap_err();
        assert!(why.contains("unknown uid") && first);
        assert!(!gate.decide(Err("EINVAL".into())).unwrap_err().1);
        // Bounded memory: past the cap, refusals go on, unlogged.
        for uid in 100..(100 + MAX_LOGGED_REFUSALS as u32) {
            let _ = gate.decide(Ok(uid));
        }
        assert_eq!(gate.decide(Ok(99_999)), Err(("uid 99999".into(), false)));
    }
}
