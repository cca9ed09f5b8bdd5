//! Message layout of protocol v1: a fixed 16-byte header, then an optional
//! payload, one message per `SOCK_SEQPACKET` datagram.
//!
//! Pure data: no I/O, no allocation. Everything read from the other end is
//! untrusted and goes through [`parse`], which never panics.

/// The protocol version this crate speaks; sent to workers as `LB_PROTOCOL`.
pub const VERSION: u8 = 1;

/// Every message starts with this many bytes.
pub const HEADER_LEN: usize = 16;

/// Largest message either side accepts (header + payload). Larger datagrams
/// are truncated by the receiver and reported as malformed.
pub const MAX_MESSAGE: usize = 4096;

/// Largest user-message payload.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - HEADER_LEN;

/// Message kinds. Master → worker kinds are below 16, worker → master kinds
/// from 16 up; user messages travel both ways.
pub mod kind {
    /// master → worker: accepted TCP connections, one fd each: exactly one,
    /// or up to [`super::MAX_CONN_FDS`] for a worker whose READY said
    /// [`super::ready::BATCH`] (the count in the header's byte 2, see
    /// [`super::conn_header`]). Its payload, if any, is the clients'
    /// addresses from PROXY protocol headers (`IP:port` text, one line per
    /// fd: [`super::peers`]), sent only to a worker whose READY said
    /// [`super::ready::PEER_ADDRESS`].
    pub const CONN: u8 = 1;
    /// master → worker: stop taking connections, finish the ones you have, exit.
    pub const DRAIN: u8 = 2;
    /// master → worker, under kernel dispatch only (`LB_OWN_LISTENER=1`),
    /// first of all: the worker's own listening socket (exactly one fd),
    /// which the kernel steers its connections to; the worker accepts from
    /// it itself.
    pub const LISTENER: u8 = 3;
    /// worker → master: ready for connections; none is sent before it.
    /// `value` holds flags ([`super::ready`]).
    pub const READY: u8 = 16;
    /// worker → master: `value` connections have been closed.
    pub const CLOSED: u8 = 17;
    /// worker → master: I am about to exit; send me nothing more.
    pub const LEAVING: u8 = 18;
    /// worker → master: send the process you started its stop signal (the
    /// accept shim's answer to DRAIN for a server that knows only signals).
    pub const STOP: u8 = 19;
    /// worker → master, under kernel dispatch: `value` connections were
    /// accepted from the worker's own listener (least-connections' count,
    /// with CLOSED).
    pub const ACCEPTED: u8 = 20;
    /// either way: free-form payload for the application.
    pub const USER: u8 = 32;
}

/// READY's flags (its `value`). A worker sets only those it means.
pub mod ready {
    /// "I accept from the LISTENER you sent me": under kernel dispatch a
    /// worker without it (one that predates the message) is left out of
    /// the kernel's schedule, since nobody would accept what it is sent.
    pub const OWN_LISTENER: u64 = 1;
    /// "A CONN may carry the client's address" (its payload, from a PROXY
    /// protocol header). Without it a worker is sent CONNs without payload
    /// even behind a balancer that sends PROXY headers, as before.
    pub const PEER_ADDRESS: u64 = 2;
    /// "A CONN may carry several fds" (up to [`super::MAX_CONN_FDS`]): the
    /// master then sends the connections one accept burst picked for this
    /// worker in one message, saving the kernel's per-message work. Without
    /// it a worker gets exactly one fd per CONN, as before.
    pub const BATCH: u64 = 4;
}

/// Most fds one CONN carries (to a [`ready::BATCH`] worker). Eight, as the
/// C reference master batches: the kernel's per-message cost is then an
/// eighth per connection, and an accept batch (16) still takes only two
/// messages; the fds fit the 64-byte control buffers the crate already
/// uses, and a worker needs room for only eight in each receive (the
/// kernel's own bound, `SCM_MAX_FD`, is 253).
pub const MAX_CONN_FDS: usize = 8;

/// A CONN's header: `value` is the id of its first connection (the others
/// follow, consecutive), byte 2 how many fds it carries when more than
/// one. A single-fd CONN leaves the byte zero, as it always was, so a
/// worker without [`ready::BATCH`] sees no change.
#[inline]
pub const fn conn_header(first_id: u64, count: usize) -> [u8; HEADER_LEN] {
    let mut h = header(kind::CONN, first_id);
    if count > 1 {
        h[2] = count as u8;
    }
    h
}

/// The clients' addresses a CONN's payload carries, one per fd in fd
/// order: lines separated by `\n`, an empty line for a connection lb knows
/// no address of. An empty payload is no address for any of them (a
/// single-fd CONN's payload is one address without `\n`, as it was).
#[inline]
pub fn peers(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let none = payload.is_empty();
    payload.split(|&b| b == b'\n').filter(move |_| !none)
}

/// Encodes a header: version, kind, six reserved zero bytes, `value` (u64 LE).
#[inline]
pub const fn header(kind: u8, value: u64) -> [u8; HEADER_LEN] {
    let v = value.to_le_bytes();
    [
        VERSION, kind, 0, 0, 0, 0, 0, 0, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
    ]
}

/// One decoded message. `payload` borrows the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// `count` connections (as many fds beside it, 1 unless the worker
    /// said [`ready::BATCH`]); `id` is the master's sequence number for
    /// the first, the others' follow; `peer` the clients' addresses from
    /// PROXY headers (`IP:port`, one line per fd: [`peers`]; empty when lb
    /// has none: no header, or a LOCAL one).
    Conn {
        id: u64,
        count: usize,
        peer: &'a [u8],
    },
    Drain,
    /// The worker's own listener (its fd travels beside the message).
    Listener,
    Ready {
        flags: u64,
    },
    Closed {
        n: u64,
    },
    Leaving,
    Stop,
    Accepted {
        n: u64,
    },
    User(&'a [u8]),
    /// A kind this version does not know: ignored by design (forward compatibility).
    Unknown(u8),
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("protocol version {0} is not supported (this master speaks {VERSION})")]
    Version(u8),
    #[error("message is longer than {MAX_MESSAGE} bytes")]
    Truncated,
    #[error("message kind {0} must not carry a payload")]
    UnexpectedPayload(u8),
    #[error("message kind {0} is not sent in this direction")]
    WrongDirection(u8),
    #[error("message carried file descriptors (closed unused)")]
    UnexpectedFd,
    #[error("CLOSED reported {0} more connections than were open")]
    OverClosed(u64),
    #[error("STOP before DRAIN (ignored: STOP answers DRAIN)")]
    EarlyStop,
    #[error("Node.js cluster message: {0}")]
    Node(super::node::Bad),
}

/// Decodes one datagram (`truncated` = the kernel reported `MSG_TRUNC`).
pub fn parse(buf: &[u8], truncated: bool) -> Result<Message<'_>, Malformed> {
    if truncated {
        return Err(Malformed::Truncated);
    }
    if buf.len() < HEADER_LEN {
        return Err(Malformed::Short(buf.len()));
    }
    if buf[0] != VERSION {
        return Err(Malformed::Version(buf[0]));
    }
    let kind = buf[1];
    let mut value = [0u8; 8];
    value.copy_from_slice(&buf[8..16]);
    let value = u64::from_le_bytes(value);
    let payload = &buf[HEADER_LEN..];
    let msg = match kind {
        kind::USER => return Ok(Message::User(payload)),
        kind::CONN => {
            return Ok(Message::Conn {
                id: value,
                // Zero from a master that predates batching, or for one fd.
                count: usize::from(buf[2].max(1)),
                peer: payload,
            });
        }
        kind::DRAIN => Message::Drain,
        kind::LISTENER => Message::Listener,
        kind::READY => Message::Ready { flags: value },
        kind::CLOSED => Message::Closed { n: value },
        kind::LEAVING => Message::Leaving,
        kind::STOP => Message::Stop,
        kind::ACCEPTED => Message::Accepted { n: value },
        other => return Ok(Message::Unknown(other)),
    };
    if !payload.is_empty() {
        return Err(Malformed::UnexpectedPayload(kind));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = header(kind::CLOSED, 0x0102_0304_0506_0708);
        assert_eq!(h[0], VERSION);
        assert_eq!(
            parse(&h, false),
            Ok(Message::Closed {
                n: 0x0102_0304_0506_0708
            })
        );
        assert_eq!(
            parse(&header(kind::CONN, 7), false),
            Ok(Message::Conn {
                id: 7,
                count: 1,
                peer: b""
            })
        );
        let mut with_peer = header(kind::CONN, 8).to_vec();
        with_peer.extend_from_slice(b"203.0.113.7:4242");
        assert_eq!(
            parse(&with_peer, false),
            Ok(Message::Conn {
                id: 8,
                count: 1,
                peer: b"203.0.113.7:4242"
            })
        );
    }

    #[test]
    fn a_conn_with_several_fds_says_how_many_and_keeps_one_address_each() {
        let h = conn_header(40, 3);
        assert_eq!(h[..2], header(kind::CONN, 40)[..2]);
        assert_eq!(h[8..], header(kind::CONN, 40)[8..]);
        let mut msg = h.to_vec();
        msg.extend_from_slice(b"203.0.113.7:1\n\n[2001:db8::7]:3");
        let Ok(Message::Conn { id, count, peer }) = parse(&msg, false) else {
            panic!("not a CONN");
        };
        assert_eq!((id, count), (40, 3));
        let lines: Vec<&[u8]> = peers(peer).collect();
        assert_eq!(lines, [&b"203.0.113.7:1"[..], b"", b"[2001:db8::7]:3"]);
        // One fd: the header is what it always was; no payload, no address.
        assert_eq!(conn_header(9, 1), header(kind::CONN, 9));
        assert_eq!(
            parse(&conn_header(9, 1), false),
            Ok(Message::Conn {
                id: 9,
                count: 1,
                peer: b""
            })
        );
        assert_eq!(peers(b"").count(), 0);
        assert_eq!(peers(b"203.0.113.7:1").count(), 1);
        assert_eq!(conn_header(1, MAX_CONN_FDS)[2] as usize, MAX_CONN_FDS);
    }

    #[test]
    fn user_payload_is_borrowed() {
        let mut buf = header(kind::USER, 0).to_vec();
        buf.extend_from_slice(b"hi");
        assert_eq!(parse(&buf, false), Ok(Message::User(b"hi")));
    }

    #[test]
    fn untrusted_input_is_rejected_not_panicked_on() {
        assert_eq!(parse(b"", false), Err(Malformed::Short(0)));
        assert_eq!(parse(&[1; 15], false), Err(Malformed::Short(15)));
        let mut bad = header(kind::READY, 0);
        bad[0] = 9;
        assert_eq!(parse(&bad, false), Err(Malformed::Version(9)));
        assert_eq!(
            parse(&header(kind::READY, 0), true),
            Err(Malformed::Truncated)
        );
        let mut extra = header(kind::READY, 0).to_vec();
        extra.push(0);
        assert_eq!(
            parse(&extra, false),
            Err(Malformed::UnexpectedPayload(kind::READY))
        );
    }

    #[test]
    fn ready_carries_its_flags() {
        assert_eq!(
            parse(&header(kind::READY, ready::OWN_LISTENER), false),
            Ok(Message::Ready {
                flags: ready::OWN_LISTENER
            })
        );
        assert_eq!(
            parse(&header(kind::ACCEPTED, 3), false),
            Ok(Message::Accepted { n: 3 })
        );
    }

    #[test]
    fn unknown_kinds_are_ignorable() {
        assert_eq!(parse(&header(200, 5), false), Ok(Message::Unknown(200)));
    }
}
