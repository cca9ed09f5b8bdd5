//! One accepted connection on its way to a worker: its fd, the listener it
//! came from, and the client's address when a PROXY header said it
//! (`docs/proxy-protocol.md`). A plain value (no allocation), held in the
//! preallocated batch and `pending`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::proto::wire::MAX_CONN_FDS;

#[derive(Debug)]
pub struct Conn {
    pub fd: OwnedFd,
    /// From the connection's PROXY header; `None` without one (lb reads
    /// none, the source was served untrusted, or it was `LOCAL`).
    pub peer: Option<SocketAddr>,
    /// The index of lb's listener that accepted it: a Node worker serves
    /// each listener with the server that asked for it (`docs/node.md`).
    /// One read back from an lb-protocol worker's channel (its CONN does
    /// not say) is given the listener of its local address
    /// (`Dispatcher::label_read_back`).
    pub listener: u16,
}

impl Conn {
    /// A connection from listener `listener`, without a client address.
    #[inline]
    pub fn new(fd: OwnedFd, listener: usize) -> Conn {
        Conn {
            fd,
            peer: None,
            listener: listener as u16,
        }
    }
}

impl From<OwnedFd> for Conn {
    #[inline]
    fn from(fd: OwnedFd) -> Conn {
        Conn::new(fd, 0)
    }
}

impl AsFd for Conn {
    #[inline]
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Connections held while no worker can take one, oldest first. Takes a
/// bare fd (no client address) or a [`Conn`].
#[derive(Debug)]
pub struct Pending(VecDeque<Conn>);

impl Pending {
    pub fn with_capacity(n: usize) -> Pending {
        Pending(VecDeque::with_capacity(n))
    }

    #[inline]
    pub fn push_back(&mut self, c: impl Into<Conn>) {
        self.0.push_back(c.into());
    }

    #[inline]
    pub fn push_front(&mut self, c: impl Into<Conn>) {
        self.0.push_front(c.into());
    }

    #[inline]
    pub fn pop_front(&mut self) -> Option<Conn> {
        self.0.pop_front()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `n` held last, newest first.
    pub fn newest_mut(&mut self, n: usize) -> impl Iterator<Item = &mut Conn> {
        self.0.iter_mut().rev().take(n)
    }
}

/// The longest `SocketAddr` text: `[v6%scope]:port`.
const PEER_TEXT_MAX: usize = 64;

/// A client's address as a CONN's payload (`IP:port`, `[v6]:port`: what
/// `SocketAddr` prints and parses), on the stack.
#[derive(Clone, Copy)]
pub struct PeerText {
    buf: [u8; PEER_TEXT_MAX],
    len: u8,
}

impl PeerText {
    pub const EMPTY: PeerText = PeerText {
        buf: [0; PEER_TEXT_MAX],
        len: 0,
    };

    /// Formatting a `SocketAddr` writes its parts straight into the
    /// slice: no allocation.
    #[inline]
    pub fn of(peer: Option<&SocketAddr>) -> PeerText {
        let mut t = PeerText::EMPTY;
        if let Some(p) = peer {
            let mut out = &mut t.buf[..];
            if write!(out, "{p}").is_ok() {
                t.len = (PEER_TEXT_MAX - out.len()) as u8;
            }
        }
        t
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl AsRef<[u8]> for PeerText {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// The clients' addresses of the connections one CONN carries to a
/// batching worker, one line each in fd order (`wire::peers`), on the stack.
#[derive(Clone, Copy)]
pub struct PeerLines {
    buf: [u8; MAX_CONN_FDS * (PEER_TEXT_MAX + 1)],
    len: usize,
}

impl PeerLines {
    pub const EMPTY: PeerLines = PeerLines {
        buf: [0; MAX_CONN_FDS * (PEER_TEXT_MAX + 1)],
        len: 0,
    };

    /// The first `MAX_CONN_FDS` of `conns`: an empty line for one without
    /// an address, no text at all when none has one.
    #[inline]
    pub fn of(conns: &[Conn]) -> PeerLines {
        let mut l = PeerLines::EMPTY;
        if conns.iter().all(|c| c.peer.is_none()) {
            return l;
        }
        for (i, c) in conns.iter().take(MAX_CONN_FDS).enumerate() {
            if i > 0 {
                l.buf[l.len] = b'\n';
                l.len += 1;
            }
            let t = PeerText::of(c.peer.as_ref());
            let t = t.as_bytes();
            l.buf[l.len..l.len + t.len()].copy_from_slice(t);
            l.len += t.len();
        }
        l
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for PeerLines {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_what_socketaddr_parses() {
        for text in [
            "203.0.113.7:4242",
            "[2001:db8::7]:4242",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let t = PeerText::of(Some(&addr));
            assert_eq!(std::str::from_utf8(t.as_bytes()).unwrap(), text);
        }
        assert!(PeerText::of(None).as_bytes().is_empty());
    }

    #[test]
    fn peer_lines_are_one_line_per_connection_in_order() {
        let (a, _b) = crate::proto::pair().unwrap();
        let conn = |peer: Option<&str>| Conn {
            fd: a.try_clone().unwrap(),
            peer: peer.map(|p| p.parse().unwrap()),
            listener: 0,
        };
        let conns = [
            conn(Some("203.0.113.7:1")),
            conn(None),
            conn(Some("[2001:db8::7]:3")),
        ];
        let l = PeerLines::of(&conns);
        assert_eq!(l.as_bytes(), b"203.0.113.7:1\n\n[2001:db8::7]:3");
        let lines: Vec<&[u8]> = crate::proto::wire::peers(l.as_bytes()).collect();
        assert_eq!(lines.len(), 3);
        assert!(
            PeerLines::of(&[conn(None), conn(None)])
                .as_bytes()
                .is_empty()
        );
    }
}
