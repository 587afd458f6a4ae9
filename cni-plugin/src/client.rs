//! The node agent's unix socket: one JSON line out ([`Request`]), one JSON line back
//! ([`Reply`]), everything within one deadline.
//!
//! Synchronous on purpose: the plugin lives for one request, so a runtime would only cost
//! start-up time. The deadline covers `connect()` too — a hung agent whose accept backlog is
//! full would otherwise block `connect()` on a unix socket forever — by setting SO_SNDTIMEO,
//! which Linux honours for unix-stream connects, before connecting.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambient_net::proto::{Reply, Request};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::{TimeVal, TimeValLike};

/// A reply longer than this is not from our agent.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// Why the agent could not be asked. Every variant means "the agent is unavailable" to the
/// failure policy in [`crate::cmd`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the agent failed: {0}")]
    Io(io::Error),
    #[error("the agent closed the connection without replying")]
    NoReply,
    #[error("the agent's reply exceeds {MAX_REPLY_BYTES} bytes")]
    ReplyTooLong,
    #[error("the agent's reply is not a valid reply: {0}")]
    BadReply(String),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// A client for one agent socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        AgentClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and waits for its reply, all within the client's timeout.
    pub fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut line =
            serde_json::to_string(req).map_err(|e| ClientError::Encode(e.to_string()))?;
        line.push('\n');

        let mut stream = self.connect(deadline)?;
        stream
            .set_write_timeout(Some(self.remaining(deadline)?))
            .map_err(ClientError::Io)?;
        stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io_error(e))?;

        let reply = self.read_line(&mut stream, deadline)?;
        serde_json::from_slice::<Reply>(&reply).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    fn connect(&self, deadline: Instant) -> Result<UnixStream, ClientError> {
        let connect_err = |e: Errno| ClientError::Connect {
            path: self.socket.display().to_string(),
            source: io::Error::from(e),
        };
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(connect_err)?;
        let addr = UnixAddr::new(self.socket.as_path()).map_err(connect_err)?;
        loop {
            let left = self.remaining(deadline)?;
            // A zero timeval means "no timeout": never pass less than 1µs.
            let micros = i64::try_from(left.as_micros()).unwrap_or(i64::MAX).max(1);
            socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros))
                .map_err(connect_err)?;
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => return Ok(UnixStream::from(fd)),
                Err(Errno::EINTR) => continue,
                // The backlog stayed full until SO_SNDTIMEO expired.
                Err(Errno::EAGAIN) => return Err(ClientError::Timeout(self.timeout)),
                Err(e) => return Err(connect_err(e)),
            }
        }
    }

    /// Reads up to the first newline (or EOF) within the deadline.
    fn read_line(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<Vec<u8>, ClientError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            stream
                .set_read_timeout(Some(self.remaining(deadline)?))
                .map_err(ClientError::Io)?;
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                        buf.truncate(end);
                        break;
                    }
                    if buf.len() > MAX_REPLY_BYTES {
                        return Err(ClientError::ReplyTooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            return Err(ClientError::NoReply);
        }
        Ok(buf)
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ClientError::Timeout(self.timeout))
        } else {
            Ok(left)
        }
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout(self.timeout)
            }
            _ => ClientError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn serve_once(listener: UnixListener, answer: &'static [u8]) -> thread::JoinHandle<String> {
        thread::spawn(move || {
            // Give up after a while so a client that never connects fails the test.
            listener.set_nonblocking(true).unwrap();
            let start = Instant::now();
            let s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if start.elapsed() < Duration::from_secs(10) => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("no connection: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            (&s).write_all(answer).unwrap();
            line
        })
    }

    #[test]
    fn one_line_each_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let server = serve_once(
            UnixListener::bind(&path).unwrap(),
            b"{\"result\":\"ok\",\"enrolled\":true,\"reason\":\"ambient namespace\"}\n",
        );
        let c = AgentClient::new(&path, Duration::from_secs(5));
        let reply = c
            .call(&Request::Del {
                container_id: "c1".into(),
                if_name: "eth0".into(),
            })
            .unwrap();
        assert_eq!(reply, Reply::ok(true, "ambient namespace"));
        let sent = server.join().unwrap();
        assert!(sent.ends_with('\n'));
        assert_eq!(
            serde_json::from_str::<Request>(&sent).unwrap(),
            Request::Del {
                container_id: "c1".into(),
                if_name: "eth0".into()
            }
        );
    }

    #[test]
    fn reply_without_newline_before_eof_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let server = serve_once(
            UnixListener::bind(&path).unwrap(),
            b"{\"result\":\"error\",\"message\":\"no ztunnel\",\"retry\":true}",
        );
        let c = AgentClient::new(&path, Duration::from_secs(5));
        assert_eq!(
            c.call(&Request::Status).unwrap(),
            Reply::error("no ztunnel", true)
        );
        server.join().unwrap();
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = AgentClient::new(dir.path().join("nope.sock"), Duration::from_secs(1));
        match c.call(&Request::Status) {
            Err(ClientError::Connect { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_empty_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let server = serve_once(UnixListener::bind(&path).unwrap(), b"hello\n");
        let c = AgentClient::new(&path, Duration::from_secs(5));
        assert!(matches!(
            c.call(&Request::Status),
            Err(ClientError::BadReply(_))
        ));
        server.join().unwrap();

        let path = dir.path().join("e.sock");
        let server = serve_once(UnixListener::bind(&path).unwrap(), b"");
        let c = AgentClient::new(&path, Duration::from_secs(5));
        assert!(matches!(
            c.call(&Request::Status),
            Err(ClientError::NoReply)
        ));
        server.join().unwrap();
    }

    #[test]
    fn silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hold = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_millis(1500));
            drop(s);
        });
        let c = AgentClient::new(&path, Duration::from_millis(200));
        let t = Instant::now();
        assert!(matches!(
            c.call(&Request::Status),
            Err(ClientError::Timeout(_))
        ));
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
        hold.join().unwrap();
    }

    #[test]
    fn full_backlog_times_out_in_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sock");
        // A listener that never accepts, with the smallest backlog.
        let lfd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(lfd.as_raw_fd(), &UnixAddr::new(path.as_path()).unwrap()).unwrap();
        socket::listen(&lfd, socket::Backlog::new(0).unwrap()).unwrap();
        // Fill the queue with non-blocking connects until one would block.
        let mut held = Vec::new();
        loop {
            let fd = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let r = socket::connect(fd.as_raw_fd(), &UnixAddr::new(path.as_path()).unwrap());
            held.push(fd);
            match r {
                Ok(()) => assert!(held.len() < 64, "backlog never filled"),
                Err(Errno::EAGAIN) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let c = AgentClient::new(&path, Duration::from_millis(200));
        let t = Instant::now();
        let r = c.call(&Request::Status);
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
}
