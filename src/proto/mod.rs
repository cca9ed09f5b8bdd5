//! The master↔worker contracts, shared by both sides: lb's own protocol v1
//! (the environment a worker is started with, the message layout ([`wire`])
//! and fd passing ([`scm`]), documented for other languages in
//! `docs/protocol.md`), and Node.js's cluster IPC ([`node`], `docs/node.md`).
//!
//! Imports nothing else from this crate, so it can become its own crate.

pub mod node;
pub mod scm;
pub mod wire;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

pub use scm::Wait;
pub use wire::{HEADER_LEN, MAX_MESSAGE, MAX_PAYLOAD, Malformed, Message, VERSION, kind};

/// The fd number at which a worker finds its end of the channel.
pub const WORKER_FD: i32 = 3;

/// Environment variables a worker is started with.
pub mod env {
    /// The channel's fd number (always 3).
    pub const FD: &str = "LB_FD";
    /// The worker's stable slot, 0..N-1.
    pub const WORKER_ID: &str = "LB_WORKER_ID";
    /// The configuration generation the worker belongs to (1 at start).
    pub const GENERATION: &str = "LB_GENERATION";
    /// The protocol version (1).
    pub const PROTOCOL: &str = "LB_PROTOCOL";
    /// `1` when the policy uses CLOSED reports (least-connections), `0`
    /// when nothing reads them: a worker may then skip them. Reading them
    /// costs the master about 15% of its CPU per connection.
    pub const REPORT_CLOSED: &str = "LB_REPORT_CLOSED";
    /// How long the master lets a worker drain before it kills it, in
    /// milliseconds (its `drain_timeout`).
    pub const DRAIN_TIMEOUT_MS: &str = "LB_DRAIN_TIMEOUT_MS";
    /// `1` under kernel dispatch: a LISTENER message comes first, and the
    /// worker accepts from it itself; `0` otherwise.
    pub const OWN_LISTENER: &str = "LB_OWN_LISTENER";
}

/// The longest a draining worker keeps an idle connection open (for a
/// request that may already be on its way), and keeps a closing one half
/// open (for the client's FIN): `docs/protocol.md` §4.
pub const IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The idle grace for a worker given `drain_timeout`: [`IDLE_GRACE`], or
/// a quarter of the drain if that is less, so that an idle wait and a
/// lingering close back to back take at most half of it.
pub fn idle_grace(drain_timeout: Option<std::time::Duration>) -> std::time::Duration {
    drain_timeout.map_or(IDLE_GRACE, |d| IDLE_GRACE.min(d / 4))
}

/// Creates one channel: `(master end, worker end)`, both CLOEXEC. The master
/// keeps a copy of the worker end too, to read back the connections a dead
/// worker never took (`docs/architecture.md`, "Promises").
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Creates one Node.js IPC channel (`SOCK_STREAM`, what libuv makes for
/// `stdio: 'ipc'`): `(master end, worker end)`, both CLOEXEC.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// master → worker: hands over one connection. The caller closes its copy of
/// `conn` right after this returns (`docs/architecture.md`, "The hot path").
#[inline]
pub fn send_conn(chan: BorrowedFd<'_>, conn: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    send_conn_with(chan, conn, id, &[])
}

/// [`send_conn`] with the client's address (`IP:port` text) as the CONN's
/// payload, for a worker whose READY said `PEER_ADDRESS`; empty for none.
#[inline]
pub fn send_conn_with(
    chan: BorrowedFd<'_>,
    conn: BorrowedFd<'_>,
    id: u64,
    peer: &[u8],
) -> io::Result<()> {
    let header = wire::header(kind::CONN, id);
    scm::send(chan, &header, peer, Some(conn), Wait::DontWait).map(drop)
}

/// master → worker, under kernel dispatch: the worker's own listener.
pub fn send_listener(chan: BorrowedFd<'_>, listener: BorrowedFd<'_>) -> io::Result<()> {
    let header = wire::header(kind::LISTENER, 0);
    scm::send(chan, &header, &[], Some(listener), Wait::DontWait).map(drop)
}

/// master → worker: hands over several connections to one worker with one
/// `sendmmsg`, `per` fds to a CONN (1 for a worker that did not say
/// `ready::BATCH`; at most [`wire::MAX_CONN_FDS`]), ids `first_id`,
/// `first_id + 1`, … in fd order; `payloads[i]`, when given (empty: none),
/// is the i-th CONN's payload, its clients' addresses ([`wire::peers`]).
/// Returns how many connections went out (the first ones: a CONN goes
/// whole or not at all); the caller closes those at once.
#[inline]
pub fn send_conns<F: std::os::fd::AsFd, P: AsRef<[u8]>>(
    chan: BorrowedFd<'_>,
    conns: &[F],
    payloads: &[P],
    first_id: u64,
    per: usize,
) -> io::Result<usize> {
    let per = per.clamp(1, wire::MAX_CONN_FDS);
    let mut headers = [[0u8; HEADER_LEN]; scm::SEND_BATCH];
    let n = conns.len().min(scm::SEND_BATCH * per);
    let messages = n.div_ceil(per);
    for (i, h) in headers.iter_mut().take(messages).enumerate() {
        let count = per.min(n - i * per);
        *h = wire::conn_header(first_id + (i * per) as u64, count);
    }
    let sent = scm::send_grouped(chan, &headers[..messages], payloads, &conns[..n], per)?;
    Ok((sent * per).min(n))
}

/// Sends a message without an fd: DRAIN, READY, CLOSED, LEAVING or USER.
pub fn send_plain(
    chan: BorrowedFd<'_>,
    kind: u8,
    value: u64,
    payload: &[u8],
    wait: Wait,
) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message payload of {} bytes exceeds {MAX_PAYLOAD}",
                payload.len()
            ),
        ));
    }
    scm::send(chan, &wire::header(kind, value), payload, None, wait).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A real socketpair, a real TCP connection: the fd that arrives is the
    /// same socket (bytes written to it reach the original peer).
    #[test]
    fn conn_fd_round_trips_over_a_real_socketpair() {
        let (master, worker) = pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();

        send_conn(master.as_fd(), accepted.as_fd(), 42).unwrap();
        drop(accepted); // the master's copy is closed at once

        let mut buf = [0u8; MAX_MESSAGE];
        let mut got = scm::recv(worker.as_fd(), &mut buf, Wait::Block).unwrap();
        assert_eq!(
            wire::parse(&buf[..got.len], got.truncated),
            Ok(Message::Conn {
                id: 42,
                count: 1,
                peer: b""
            })
        );
        assert_eq!(got.fds.len(), 1);
        let mut stream = TcpStream::from(got.fds.take_first().unwrap());
        stream.write_all(b"via the passed fd").unwrap();
        drop(stream);
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        assert_eq!(text, "via the passed fd");
    }

    #[test]
    fn plain_messages_carry_no_fd_and_keep_their_payload() {
        let (master, worker) = pair().unwrap();
        send_plain(worker.as_fd(), kind::USER, 0, b"hello", Wait::Block).unwrap();
        send_plain(worker.as_fd(), kind::CLOSED, 3, &[], Wait::Block).unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let got = scm::recv(master.as_fd(), &mut buf, Wait::DontWait).unwrap();
        assert!(got.fds.is_empty());
        assert_eq!(
            wire::parse(&buf[..got.len], false),
            Ok(Message::User(b"hello"))
        );
        let got = scm::recv(master.as_fd(), &mut buf, Wait::DontWait).unwrap();
        assert_eq!(
            wire::parse(&buf[..got.len], false),
            Ok(Message::Closed { n: 3 })
        );
        let empty = scm::recv(master.as_fd(), &mut buf, Wait::DontWait);
        assert_eq!(
            empty.err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn extra_fds_from_a_buggy_peer_are_received_and_counted() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        // Two messages each carrying one fd; the receiver sees exactly one per message.
        for _ in 0..2 {
            scm::send(
                a.as_fd(),
                &wire::header(kind::READY, 0),
                &[],
                Some(x.as_fd()),
                Wait::Block,
            )
            .unwrap();
        }
        let mut buf = [0u8; MAX_MESSAGE];
        for _ in 0..2 {
            let got = scm::recv(b.as_fd(), &mut buf, Wait::DontWait).unwrap();
            assert_eq!(got.fds.len(), 1);
            assert!(!got.fds_truncated);
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_sending() {
        let (a, _b) = pair().unwrap();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let err = send_plain(a.as_fd(), kind::USER, 0, &big, Wait::Block).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::scm::{BATCH, Batch, RecvBatch};
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn recv_batch_takes_many_and_a_short_count_means_drained() {
        let (a, b) = pair().unwrap();
        for n in 0..(BATCH as u64 + 3) {
            send_plain(a.as_fd(), kind::CLOSED, n, &[], Wait::Block).unwrap();
        }
        send_plain(a.as_fd(), kind::USER, 0, b"payload", Wait::Block).unwrap();
        let mut batch = RecvBatch::new(MAX_MESSAGE);
        assert_eq!(batch.recv(b.as_fd()).unwrap(), Batch::Got(BATCH));
        for i in 0..BATCH {
            let d = batch.get(i);
            assert_eq!(
                wire::parse(d.data, d.truncated),
                Ok(Message::Closed { n: i as u64 })
            );
        }
        assert_eq!(batch.recv(b.as_fd()).unwrap(), Batch::Got(4));
        assert_eq!(
            wire::parse(batch.get(3).data, false),
            Ok(Message::User(b"payload"))
        );
        let empty = batch.recv(b.as_fd()).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(batch.recv(b.as_fd()).unwrap(), Batch::Closed);
    }

    #[test]
    fn send_conns_sends_one_datagram_per_fd_in_order() {
        use std::net::{TcpListener, TcpStream};
        let (master, worker) = pair().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..3).map(|_| l.accept().unwrap().0).collect();
        assert_eq!(
            send_conns(master.as_fd(), &accepted, &[] as &[&[u8]], 10, 1).unwrap(),
            3
        );
        drop(accepted);
        let mut buf = [0u8; MAX_MESSAGE];
        for (i, client) in clients.iter().enumerate() {
            let mut got = scm::recv(worker.as_fd(), &mut buf, Wait::DontWait).unwrap();
            assert_eq!(
                wire::parse(&buf[..got.len], false),
                Ok(Message::Conn {
                    id: 10 + i as u64,
                    count: 1,
                    peer: b""
                })
            );
            let stream = TcpStream::from(got.fds.take_first().unwrap());
            // The i-th fd is the i-th client's connection.
            assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
        }
    }

    /// Each CONN of a batch carries its own payload (or none), and its own fd.
    #[test]
    fn send_conns_carries_each_payload_with_its_fd() {
        use std::net::{TcpListener, TcpStream};
        let (master, worker) = pair().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..3).map(|_| l.accept().unwrap().0).collect();
        let peers: [&[u8]; 3] = [b"203.0.113.7:4242", b"", b"[2001:db8::7]:1"];
        assert_eq!(
            send_conns(master.as_fd(), &accepted, &peers, 5, 1).unwrap(),
            3
        );
        let mut buf = [0u8; MAX_MESSAGE];
        for (i, want) in peers.iter().enumerate() {
            let got = scm::recv(worker.as_fd(), &mut buf, Wait::DontWait).unwrap();
            assert_eq!(got.fds.len(), 1);
            assert_eq!(
                wire::parse(&buf[..got.len], false),
                Ok(Message::Conn {
                    id: 5 + i as u64,
                    count: 1,
                    peer: want
                })
            );
        }
    }

    /// A batching worker's CONNs: `per` fds each, the count in the header,
    /// ids consecutive, each fd the right client's, the addresses in fd
    /// order; 11 connections at 8 a CONN are two CONNs (8 and 3).
    #[test]
    fn send_conns_groups_fds_into_conns_for_a_batching_worker() {
        use std::net::{TcpListener, TcpStream};
        let (master, worker) = pair().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<TcpStream> = (0..11)
            .map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..11).map(|_| l.accept().unwrap().0).collect();
        let payloads: [&[u8]; 2] = [b"", b"203.0.113.7:1\n\n[2001:db8::7]:3"];
        let per = wire::MAX_CONN_FDS;
        assert_eq!(
            send_conns(master.as_fd(), &accepted, &payloads, 100, per).unwrap(),
            11
        );
        drop(accepted);
        let mut buf = [0u8; MAX_MESSAGE];
        let mut next = 0;
        for (want, payload) in [(8, payloads[0]), (3, payloads[1])] {
            let mut got = scm::recv(worker.as_fd(), &mut buf, Wait::DontWait).unwrap();
            assert!(!got.fds_truncated);
            assert_eq!(
                wire::parse(&buf[..got.len], false),
                Ok(Message::Conn {
                    id: 100 + next as u64,
                    count: want,
                    peer: payload
                })
            );
            assert_eq!(got.fds.len(), want);
            for fd in got.fds.take_all() {
                let stream = TcpStream::from(fd);
                assert_eq!(
                    stream.peer_addr().unwrap(),
                    clients[next].local_addr().unwrap()
                );
                next += 1;
            }
        }
        assert_eq!(next, 11);
        let empty = scm::recv(worker.as_fd(), &mut buf, Wait::DontWait);
        assert!(empty.is_err());
    }

    /// A channel with room for one more message: of 16 connections at 8
    /// a CONN the first 8 go, whole, and the count says so; the other 8
    /// stay the caller's (a CONN never goes in part).
    #[test]
    fn send_conns_to_a_full_channel_sends_whole_conns_only() {
        let (master, worker) = pair().unwrap();
        socket2::SockRef::from(&master)
            .set_send_buffer_size(0)
            .unwrap();
        let (x, _y) = pair().unwrap();
        let mut queued = 0;
        while send_conn(master.as_fd(), x.as_fd(), 0).is_ok() {
            queued += 1;
            assert!(queued < 10_000, "the channel never filled");
        }
        let mut buf = [0u8; MAX_MESSAGE];
        // Room for exactly one message again.
        drop(scm::recv(worker.as_fd(), &mut buf, Wait::DontWait).unwrap());
        let fds: Vec<_> = (0..16).map(|_| x.try_clone().unwrap()).collect();
        let per = wire::MAX_CONN_FDS;
        assert_eq!(
            send_conns(master.as_fd(), &fds, &[] as &[&[u8]], 100, per).unwrap(),
            8
        );
        let full = send_conns(master.as_fd(), &fds[8..], &[] as &[&[u8]], 108, per);
        assert_eq!(full.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let mut last = None;
        while let Ok(got) = scm::recv(worker.as_fd(), &mut buf, Wait::DontWait) {
            if let Ok(Message::Conn { id, count, .. }) = wire::parse(&buf[..got.len], false) {
                last = Some((id, count, got.fds.len()));
            }
        }
        // The queued single ones, then the one CONN of 8, and nothing after.
        assert_eq!(last, Some((100, 8, 8)));
    }

    #[test]
    fn recv_batch_closes_unexpected_fds_and_marks_them() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        scm::send(
            a.as_fd(),
            &wire::header(kind::READY, 0),
            &[],
            Some(x.as_fd()),
            Wait::Block,
        )
        .unwrap();
        let mut batch = RecvBatch::new(MAX_MESSAGE);
        assert_eq!(batch.recv(b.as_fd()).unwrap(), Batch::Got(1));
        assert!(batch.get(0).had_fds);
    }
}
