//! The client's address a CONN may carry (`docs/protocol.md` §2, "The
//! client's address behind a balancer"): the master read it from a PROXY
//! protocol header, and the socket's own peer is the balancer.

use std::net::SocketAddr;

/// The address in a CONN's payload (`IP:port`, `[v6]:port`), if it holds
/// one. Anything else (empty: lb knows none; not text; not an address) is
/// no address: the payload is the master's, and a worker that cannot read
/// it serves the connection anyway. Parses in place, allocating nothing.
pub(super) fn of_payload(payload: &[u8]) -> Option<SocketAddr> {
    if payload.is_empty() {
        return None;
    }
    std::str::from_utf8(payload).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_parse() {
        assert_eq!(
            of_payload(b"203.0.113.7:4242"),
            Some("203.0.113.7:4242".parse().unwrap())
        );
        assert_eq!(
            of_payload(b"[2001:db8::7]:4242"),
            Some("[2001:db8::7]:4242".parse().unwrap())
        );
    }

    #[test]
    fn anything_else_is_no_address() {
        for bad in [
            &b""[..],
            b"203.0.113.7",
            b"203.0.113.7:",
            b"203.0.113.7:65536",
            b"2001:db8::7:4242",
            b"[2001:db8::7]",
            b"localhost:80",
            b" 203.0.113.7:4242",
            b"203.0.113.7:4242\n",
            b"\xff\xfe:1",
            &[0u8; 4080][..],
        ] {
            assert_eq!(of_payload(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
