//! Set elements over nf_tables netlink, without the `nft` binary.
//!
//! CNI ADD and DEL only touch the pod sets' elements. Running `nft` for that costs a process,
//! the JSON parser and a ruleset cache fill (for a delete, nft lists every element of the set,
//! so its cost grows with the number of pods): a few milliseconds per pod. This module sends the
//! same change as one nfnetlink batch (one kernel transaction, all or nothing) on a
//! `NETLINK_NETFILTER` socket of the calling thread's network namespace, kept open between
//! changes (see [`apply`]).
//!
//! Only elements: tables, sets and chains stay with `nft` (see the parent module). A batch that
//! fails because the table or a set is missing is reported as such, and the caller falls back to
//! `nft`, which creates or inspects them. One batch may change sets of several tables (the node's
//! inet and bridge tables): each message names its own family and table.
//!
//! Keys are the set's key bytes: an address (4 or 16 bytes, network order), or for a
//! concatenation `ifname . addr` the interface name zero-padded to `IFNAMSIZ` (16) followed by
//! the address, each part a multiple of 4 bytes as nf_tables lays out registers.
//!
//! Message layout (linux/netfilter/nfnetlink.h, nf_tables.h): each message is a netlink
//! header, a `nfgenmsg` (family, version 0, resource id) and attributes. A batch is
//! `NFNL_MSG_BATCH_BEGIN`, the changes, `NFNL_MSG_BATCH_END`; each change asks for an ACK.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// `AF_UNSPEC` for the batch delimiters.
const AF_UNSPEC: u8 = 0;

/// What to do with some elements of one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemOp {
    Add,
    Delete,
}

/// One change of a batch: `op` these keys in `set` of `table` (nf_tables family `family`,
/// e.g. `NFPROTO_INET`).
#[derive(Debug, Clone)]
pub struct ElemChange<'a> {
    pub op: ElemOp,
    pub family: u8,
    pub table: &'a str,
    pub set: &'a str,
    pub keys: &'a [Vec<u8>],
}

/// `IFNAMSIZ`: an `ifname` key part is the name zero-padded to this length.
pub const IFNAMSIZ: usize = 16;

/// The key of an address element.
pub fn addr_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The key of an `ifname . address` element; `None` for a name that is not 1..=15 bytes.
pub fn dev_addr_key(dev: &str, ip: IpAddr) -> Option<Vec<u8>> {
    if dev.is_empty() || dev.len() >= IFNAMSIZ || dev.as_bytes().contains(&0) {
        return None;
    }
    let mut key = dev.as_bytes().to_vec();
    key.resize(IFNAMSIZ, 0);
    key.extend_from_slice(&addr_key(ip));
    Some(key)
}

/// Why a batch failed.
#[derive(Debug)]
pub enum BatchError {
    /// The kernel refused a change (errno), e.g. `ENOENT` for a missing table or set; the
    /// whole transaction was rolled back.
    Kernel(i32),
    Io(io::Error),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Kernel(e) => write!(f, "nf_tables: {}", io::Error::from_raw_os_error(*e)),
            BatchError::Io(e) => write!(f, "nf_tables netlink: {e}"),
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message being built: header fields are filled in by [`Msg::finish`].
struct Msg {
    buf: Vec<u8>,
    /// Open nested attributes: their offsets.
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data);
    }

    fn nest_start(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn nest_end(&mut self) {
        let start = self.nests.pop().expect("nest_end without nest_start");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty());
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The bytes of one batch and how many ACKs it asks for, numbered from `seq`.
pub fn encode_batch(changes: &[ElemChange<'_>], seq: u32) -> (Vec<u8>, u32) {
    let req = libc::NLM_F_REQUEST as u16;
    let ack = libc::NLM_F_ACK as u16;
    let create = libc::NLM_F_CREATE as u16;
    let mut out = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        req,
        seq,
        AF_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    )
    .finish();
    let mut acks = 0;
    for (i, c) in changes.iter().filter(|c| !c.keys.is_empty()).enumerate() {
        let (ty, flags) = match c.op {
            ElemOp::Add => (NFT_MSG_NEWSETELEM, req | ack | create),
            ElemOp::Delete => (NFT_MSG_DELSETELEM, req | ack),
        };
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            seq + 1 + i as u32,
            c.family,
            0,
        );
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, c.table);
        m.attr_str(NFTA_SET_ELEM_LIST_SET, c.set);
        m.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        for key in c.keys {
            m.nest_start(NFTA_LIST_ELEM);
            m.nest_start(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, key);
            m.nest_end();
            m.nest_end();
        }
        m.nest_end();
        out.extend_from_slice(&m.finish());
        acks += 1;
    }
    let end = Msg::new(
        NFNL_MSG_BATCH_END,
        req,
        seq + 1 + acks,
        AF_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    out.extend_from_slice(&end.finish());
    (out, acks)
}

/// The errno of each `NLMSG_ERROR` in a receive buffer (0 for an ACK), by sequence number.
pub fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
            let err = i32::from_ne_bytes(
                buf[off + NLMSG_HDRLEN..off + NLMSG_HDRLEN + 4]
                    .try_into()
                    .unwrap(),
            );
            out.push((seq, -err));
        }
        off += align4(len);
    }
    out
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a correctly sized timeval.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The socket kept for the calling thread's network namespace, identified by the (device,
/// inode) of `/proc/thread-self/ns/net`. Closing a `NETLINK_NETFILTER` socket after a
/// transaction that deleted something waits for an RCU grace period (10–20 ms here), so the
/// socket is kept open and reused instead of closed per change.
struct Cached {
    netns: (u64, u64),
    fd: OwnedFd,
    seq: u32,
}

static CACHE: std::sync::Mutex<Option<Cached>> = std::sync::Mutex::new(None);

fn current_netns() -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok((m.dev(), m.ino()))
}

/// Applies `changes` as one transaction in the calling thread's network namespace.
pub fn apply(changes: &[ElemChange<'_>]) -> Result<(), BatchError> {
    if changes.iter().all(|c| c.keys.is_empty()) {
        return Ok(());
    }
    let netns = current_netns().map_err(BatchError::Io)?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.as_ref().is_none_or(|c| c.netns != netns) {
        *cache = Some(Cached {
            netns,
            fd: socket().map_err(BatchError::Io)?,
            seq: 0,
        });
    }
    let c = cache.as_mut().expect("just set");
    // Sequence numbers keep growing, so replies left over from an earlier failed batch are
    // never taken for this one's.
    let seq = c.seq.wrapping_add(1);
    let (msg, acks) = encode_batch(changes, seq);
    c.seq = seq.wrapping_add(acks + 1);
    let r = transact(
        &c.fd,
        &msg,
        (1..=acks).map(|i| seq.wrapping_add(i)).collect(),
    );
    if matches!(r, Err(BatchError::Io(_))) {
        // A socket in an unknown state is not reused.
        *cache = None;
    }
    r
}

fn transact(fd: &OwnedFd, msg: &[u8], mut pending: Vec<u32>) -> Result<(), BatchError> {
    // SAFETY: a zeroed sockaddr_nl with the family set addresses the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msg outlives the call; addr is a valid sockaddr_nl.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(BatchError::Io(io::Error::last_os_error()));
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BatchError::Io(e));
        }
        for (s, err) in parse_acks(&buf[..n as usize]) {
            if !pending.contains(&s) {
                continue;
            }
            if err != 0 {
                return Err(BatchError::Kernel(err));
            }
            pending.retain(|p| *p != s);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn batch_layout() {
        let v4 = [addr_key(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))];
        let (b, acks) = encode_batch(
            &[
                ElemChange {
                    op: ElemOp::Add,
                    family: 1,
                    table: "t",
                    set: "s",
                    keys: &v4,
                },
                ElemChange {
                    op: ElemOp::Delete,
                    family: 1,
                    table: "t",
                    set: "s6",
                    keys: &[],
                },
            ],
            7,
        );
        assert_eq!(acks, 1);
        // begin (20) + NEWSETELEM + end (20)
        let begin_len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        assert_eq!(begin_len, 20);
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x10);
        assert_eq!(&b[18..20], &10u16.to_be_bytes());
        let m = &b[20..];
        let len = u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize;
        // header 16 + nfgenmsg 4 + "t\0" 8 + "s\0" 8 + elements 4 + elem 4 + key 4 + value 8
        assert_eq!(len, 56);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            (10 << 8) | 12
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 8);
        assert_eq!(m[16], 1);
        assert_eq!(&m[len - 4..len], &[10, 1, 2, 3]);
        let end = &m[len..];
        assert_eq!(u16::from_ne_bytes(end[4..6].try_into().unwrap()), 0x11);
        assert_eq!(end.len(), 20);
    }

    #[test]
    fn concatenated_keys_and_families_per_message() {
        let ip: IpAddr = Ipv4Addr::new(10, 1, 2, 3).into();
        let key = dev_addr_key("veth1", ip).unwrap();
        // "veth1" zero-padded to 16 bytes, then the address: nft's `ifname . ipv4_addr`.
        assert_eq!(key.len(), 20);
        assert_eq!(&key[..6], b"veth1\0");
        assert!(key[5..16].iter().all(|b| *b == 0));
        assert_eq!(&key[16..], &[10, 1, 2, 3]);
        let v6 = dev_addr_key("veth1", "fd00::1".parse().unwrap()).unwrap();
        assert_eq!(v6.len(), 32);
        for bad in ["", "sixteen-chars-xx", "a\0b"] {
            assert_eq!(dev_addr_key(bad, ip), None, "{bad:?}");
        }
        assert!(dev_addr_key("fifteen-chars-x", ip).is_some());
        let keys = [key];
        let (b, acks) = encode_batch(
            &[
                ElemChange {
                    op: ElemOp::Add,
                    family: 1,
                    table: "t",
                    set: "s",
                    keys: &keys,
                },
                ElemChange {
                    op: ElemOp::Add,
                    family: 7,
                    table: "t",
                    set: "s",
                    keys: &keys,
                },
            ],
            1,
        );
        assert_eq!(acks, 2);
        let first = &b[20..];
        let len = u32::from_ne_bytes(first[0..4].try_into().unwrap()) as usize;
        // header 16 + nfgenmsg 4 + "t\0" 8 + "s\0" 8 + elements 4 + elem 4 + key 4 + value 24
        assert_eq!(len, 72);
        assert_eq!(first[16], 1, "inet");
        assert_eq!(&first[len - 20..len], &keys[0][..]);
        assert_eq!(first[len + 16], 7, "bridge");
    }

    #[test]
    fn acks_and_errors() {
        let mut buf = Vec::new();
        for (seq, err) in [(2u32, 0i32), (3, -2)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&err.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(parse_acks(&buf), vec![(2, 0), (3, 2)]);
    }
}
