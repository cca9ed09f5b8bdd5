//! The PROXY header lb writes to a proxy-mode worker's port
//! (`send_proxy`), built on the stack: no allocation per connection.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::SendProxy;

/// Room for the longest v1 header (107 bytes); v2 over IPv6 takes 52.
const ROOM: usize = 108;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// One header, ready to write.
pub struct Built {
    buf: [u8; ROOM],
    len: usize,
}

impl Built {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Source and destination in one family, as both versions need: an
/// IPv4-mapped address is its IPv4 one; otherwise a v4 client behind a v6
/// listener gets the listener's address mapped, or the family's
/// unspecified one.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canon(src), canon(dst));
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) => (src, SocketAddr::from(([0, 0, 0, 0], dst.port()))),
        (IpAddr::V6(_), IpAddr::V4(d)) => {
            (src, SocketAddr::new(d.to_ipv6_mapped().into(), dst.port()))
        }
        _ => (src, dst),
    }
}

/// The header `version` says, for a client at `src` that came in to `dst`.
/// `None` for `SendProxy::Off`.
pub fn build(version: SendProxy, src: SocketAddr, dst: SocketAddr) -> Option<Built> {
    let (src, dst) = same_family(src, dst);
    let mut b = Built {
        buf: [0; ROOM],
        len: 0,
    };
    match version {
        SendProxy::Off => return None,
        SendProxy::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut out = &mut b.buf[..];
            write!(
                out,
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .ok()?;
            b.len = ROOM - out.len();
        }
        SendProxy::V2 => {
            let mut at = 0;
            let mut put = |bytes: &[u8]| {
                b.buf[at..at + bytes.len()].copy_from_slice(bytes);
                at += bytes.len();
            };
            put(V2_SIGNATURE);
            // Version 2, PROXY; TCP over the family.
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    put(&[0x21, 0x11, 0, 12]);
                    put(&s.octets());
                    put(&d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    put(&[0x21, 0x21, 0, 36]);
                    put(&s.octets());
                    put(&d.octets());
                }
                _ => return None,
            }
            put(&src.port().to_be_bytes());
            put(&dst.port().to_be_bytes());
            b.len = at;
        }
    }
    Some(b)
}

/// The header for a client without an address (it came in on a Unix
/// listener): v1 `UNKNOWN`, v2 `PROXY` over `AF_UNSPEC`; the worker then
/// takes the connection's own ends, as the specification says.
pub fn unknown(version: SendProxy) -> Option<Built> {
    let mut b = Built {
        buf: [0; ROOM],
        len: 0,
    };
    let bytes: &[u8] = match version {
        SendProxy::Off => return None,
        SendProxy::V1 => b"PROXY UNKNOWN\r\n",
        SendProxy::V2 => &[0x21, 0x00, 0, 0],
    };
    let signature = if version == SendProxy::V2 {
        V2_SIGNATURE
    } else {
        &[]
    };
    b.buf[..signature.len()].copy_from_slice(signature);
    b.buf[signature.len()..signature.len() + bytes.len()].copy_from_slice(bytes);
    b.len = signature.len() + bytes.len();
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::super::parse::{Framed, frame};
    use super::*;
    use crate::config::ProxyProtocol;

    /// A client without an address: headers that say so, which a reader
    /// takes as "no address" rather than as malformed.
    #[test]
    fn unknown_headers_parse_back_without_an_address() {
        for v in [SendProxy::V1, SendProxy::V2] {
            let h = unknown(v).unwrap();
            match frame(h.as_bytes(), ProxyProtocol::Any) {
                Framed::Header { len, peer, v2 } => {
                    assert_eq!(len, h.as_bytes().len());
                    assert_eq!(v2, v == SendProxy::V2);
                    assert_eq!(peer, None);
                }
                other => panic!("{v}: {other:?}"),
            }
        }
        assert!(unknown(SendProxy::Off).is_none());
    }

    /// What lb writes, lb reads back (and `ppp` checks).
    #[test]
    fn built_headers_parse_back() {
        for (src, dst) in [
            ("203.0.113.7:4242", "10.0.0.1:80"),
            ("[2001:db8::7]:4242", "[2001:db8::1]:443"),
            ("[::ffff:203.0.113.7]:4242", "[::ffff:10.0.0.1]:80"),
            ("203.0.113.7:4242", "[::1]:80"),
            ("[2001:db8::7]:1", "127.0.0.1:80"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for v in [SendProxy::V1, SendProxy::V2] {
                let h = build(v, src, dst).unwrap();
                match frame(h.as_bytes(), ProxyProtocol::Any) {
                    Framed::Header { len, peer, v2 } => {
                        assert_eq!(len, h.as_bytes().len());
                        assert_eq!(v2, v == SendProxy::V2);
                        assert_eq!(peer.unwrap().ip(), src.ip().to_canonical());
                        assert_eq!(peer.unwrap().port(), src.port());
                    }
                    other => panic!("{v}: {src} → {dst}: {other:?}"),
                }
            }
        }
        assert!(
            build(
                SendProxy::Off,
                "1.2.3.4:1".parse().unwrap(),
                "1.2.3.4:2".parse().unwrap()
            )
            .is_none()
        );
        let longest = build(
            SendProxy::V1,
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff1]:65535"
                .parse()
                .unwrap(),
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff2]:65535"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(longest.as_bytes().len(), 104);
    }
}
