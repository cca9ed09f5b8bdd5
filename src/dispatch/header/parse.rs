//! Where a PROXY header ends in the bytes a connection starts with, and
//! what it says. Framing is ours (the exact length, so that not one byte
//! of the application's is read); the header itself is checked by the
//! `ppp` crate, which parses both versions in place, without allocating.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

/// The longest header lb reads: a v2 one may carry TLVs (AWS NLB sends
/// some); one longer than this is refused as oversized.
pub const MAX_HEADER: usize = 4096;
/// The longest v1 header the specification allows, `\r\n` included.
pub const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// v2's fixed part: the signature, version and command, family, length.
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

/// Why a connection was closed before it reached a worker. The order is
/// the counters' (`Stats::proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not a header of an accepted version, or not a valid one.
    Malformed,
    /// Longer than `MAX_HEADER` (v2) or `V1_MAX` (v1).
    Oversized,
    /// Not all there within `proxy_header_timeout`.
    Timeout,
    /// From outside `proxy_trusted`, under `proxy_untrusted = refuse`.
    Untrusted,
    /// The client closed (or reset) before its header was complete.
    Closed,
    /// Every place for a connection waiting for its header was taken
    /// (only while stopping, when the backlog is taken all at once).
    Full,
}

impl Failure {
    pub const ALL: [Failure; 6] = [
        Failure::Malformed,
        Failure::Oversized,
        Failure::Timeout,
        Failure::Untrusted,
        Failure::Closed,
        Failure::Full,
    ];

    /// Its label in metrics and `lb status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::Oversized => "oversized",
            Failure::Timeout => "timeout",
            Failure::Untrusted => "untrusted",
            Failure::Closed => "closed",
            Failure::Full => "full",
        }
    }
}

/// What the bytes so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// A header's beginning: wait for more.
    Need,
    Bad(Failure),
    /// A whole header of `len` bytes.
    Header {
        len: usize,
        v2: bool,
        /// The client's address; `None` for `LOCAL` (v2) or `UNKNOWN` (v1).
        peer: Option<SocketAddr>,
    },
}

/// Whether `bytes` start with `prefix`, or are its beginning so far.
fn begins(bytes: &[u8], prefix: &[u8]) -> bool {
    let n = bytes.len().min(prefix.len());
    bytes[..n] == prefix[..n]
}

/// Frames the header at the start of `bytes` (what a peek returned, not
/// empty), if `accept` takes its version.
pub fn frame(bytes: &[u8], accept: ProxyProtocol) -> Framed {
    if accept.takes_v2() && begins(bytes, V2_SIGNATURE) {
        if bytes.len() < V2_FIXED {
            return Framed::Need;
        }
        let len = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if len > MAX_HEADER {
            return Framed::Bad(Failure::Oversized);
        }
        if bytes.len() < len {
            return Framed::Need;
        }
        return match ppp::v2::Header::try_from(&bytes[..len]) {
            Ok(h) => Framed::Header {
                len,
                v2: true,
                peer: match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (_, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    // A unix socket's, or none: no IP to give.
                    _ => None,
                },
            },
            Err(_) => Framed::Bad(Failure::Malformed),
        };
    }
    if accept.takes_v1() && begins(bytes, V1_PREFIX) {
        let window = &bytes[..bytes.len().min(V1_MAX)];
        return match window.iter().position(|&b| b == b'\r') {
            // The `\n` that must follow it has not come yet.
            Some(i) if i + 1 == bytes.len() => Framed::Need,
            Some(i) => {
                let len = i + 2;
                match ppp::v1::Header::try_from(&bytes[..len]) {
                    Ok(h) => Framed::Header {
                        len,
                        v2: false,
                        peer: match h.addresses {
                            ppp::v1::Addresses::Tcp4(a) => {
                                Some(SocketAddr::from((a.source_address, a.source_port)))
                            }
                            ppp::v1::Addresses::Tcp6(a) => {
                                Some(SocketAddr::from((a.source_address, a.source_port)))
                            }
                            ppp::v1::Addresses::Unknown => None,
                        },
                    },
                    Err(_) => Framed::Bad(Failure::Malformed),
                }
            }
            None if bytes.len() >= V1_MAX => Framed::Bad(Failure::Oversized),
            None => Framed::Need,
        };
    }
    Framed::Bad(Failure::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_headers_are_framed_to_the_byte() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 80\r\nGET /";
        assert_eq!(
            frame(h, ProxyProtocol::Any),
            Framed::Header {
                len: h.len() - 5,
                v2: false,
                peer: Some("203.0.113.7:4242".parse().unwrap())
            }
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 80\r\n";
        assert!(matches!(
            frame(h6, ProxyProtocol::V1),
            Framed::Header { peer: Some(p), .. } if p.to_string() == "[2001:db8::7]:4242"
        ));
        assert!(matches!(
            frame(b"PROXY UNKNOWN\r\n", ProxyProtocol::V1),
            Framed::Header {
                peer: None,
                len: 15,
                ..
            }
        ));
        for partial in [
            &b"P"[..],
            b"PROXY TCP4 1.2.3.4",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
        ] {
            assert_eq!(frame(partial, ProxyProtocol::V1), Framed::Need);
        }
        assert_eq!(
            frame(b"GET / HTTP/1.1\r\n", ProxyProtocol::V1),
            Framed::Bad(Failure::Malformed)
        );
        assert_eq!(
            frame(b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", ProxyProtocol::V1),
            Framed::Bad(Failure::Malformed)
        );
        assert_eq!(
            frame(&[b'P'; 200][..], ProxyProtocol::V1),
            Framed::Bad(Failure::Malformed)
        );
        let mut long = b"PROXY ".to_vec();
        long.resize(200, b'x');
        assert_eq!(
            frame(&long, ProxyProtocol::V1),
            Framed::Bad(Failure::Oversized)
        );
        // v2 only: a v1 header is not one.
        assert_eq!(frame(h, ProxyProtocol::V2), Framed::Bad(Failure::Malformed));
    }

    #[test]
    fn v2_headers_with_tlvs_local_and_oversized() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1, 0x10, 0x92, 0, 80];
        // A TLV as AWS sends (type 0xEA, the VPC endpoint id).
        body.extend_from_slice(&[0xEA, 0, 5, 1, b'v', b'p', b'c', b'e']);
        let mut h = v2(1, 0x11, &body);
        let len = h.len();
        h.extend_from_slice(b"hello");
        assert_eq!(
            frame(&h, ProxyProtocol::Any),
            Framed::Header {
                len,
                v2: true,
                peer: Some("203.0.113.7:4242".parse().unwrap())
            }
        );
        assert_eq!(frame(&h[..20], ProxyProtocol::V2), Framed::Need);
        assert_eq!(frame(&h[..3], ProxyProtocol::V2), Framed::Need);
        assert_eq!(
            frame(&h, ProxyProtocol::V1),
            Framed::Bad(Failure::Malformed)
        );
        let local = v2(0, 0, &[]);
        assert_eq!(
            frame(&local, ProxyProtocol::V2),
            Framed::Header {
                len: 16,
                v2: true,
                peer: None
            }
        );
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
        assert_eq!(
            frame(&big, ProxyProtocol::V2),
            Framed::Bad(Failure::Oversized)
        );
        // A bad version nibble.
        let bad = v2(1, 0x11, &body)
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 12 { 0x31 } else { b })
            .collect::<Vec<_>>();
        assert_eq!(
            frame(&bad, ProxyProtocol::V2),
            Framed::Bad(Failure::Malformed)
        );
    }
}
