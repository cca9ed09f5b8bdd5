//! In-process workers for a `Dispatcher` driven by a test or a benchmark:
//! real socketpairs, real fd passing, each worker on a thread of its own.
//! Shared by `tests/zero_alloc.rs` and `benches/handoff.rs` (`#[path]`).

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

use lb::config::Mode;
use lb::dispatch::{Command, Handle};
use lb::policy::Slot;
use lb::proto::{self, Wait};
use lb::worker::{Incoming, Listener};

/// Attaches the worker in `slot` (pid and weight `slot + 1`): `channel`
/// is the master's end, made non-blocking here.
fn attach(
    handle: &Handle,
    slot: usize,
    channel: OwnedFd,
    peer: Option<OwnedFd>,
    mode: Mode,
    port: u16,
) {
    nix::fcntl::fcntl(
        &channel,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    handle.send(Command::Attach {
        slot: Slot(slot),
        pid: slot as u32 + 1,
        channel: Some(channel),
        peer,
        weight: slot as u32 + 1,
        mode,
        port,
    });
}

/// Attaches `n` workers (slot i has weight i + 1 and pid i + 1) whose
/// threads say READY, call `serve` on every connection, report its close,
/// and end on DRAIN or when the channel closes.
pub fn workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    (0..n)
        .map(|slot| {
            let (master, worker) = proto::pair().unwrap();
            let peer = worker.try_clone().unwrap();
            attach(handle, slot, master, Some(peer), Mode::Native, 0);
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut l = Listener::from_fd(worker, slot, 1);
                l.ready().unwrap();
                loop {
                    match l.next(Wait::Block) {
                        Ok(Incoming::Conn(s)) => {
                            serve(s);
                            let _ = l.report_closed(1);
                        }
                        Ok(Incoming::Message(_)) => {}
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// Attaches `n` threads that speak Node.js's cluster IPC the way a Node
/// worker does (queryServer, listening, handle ACK + `accepted` reply per
/// connection, the preload's `lb_closed` report), calling `serve` on each
/// connection; they end on `disconnect`.
pub fn node_workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    use lb::proto::node::Lines;
    use lb::proto::scm;
    use std::io::Write;
    use std::os::fd::AsFd;

    (0..n)
        .map(|slot| {
            let (master, worker) = proto::stream_pair().unwrap();
            attach(handle, slot, master, None, Mode::Node, 0);
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut chan = std::os::unix::net::UnixStream::from(worker);
                let mut seq = 0u64;
                let mut next = || {
                    seq += 1;
                    seq
                };
                let query = format!(
                    "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":{}}}\n\
                     {{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\
                     \"address\":null,\"port\":8000,\"addressType\":4,\"backlog\":0,\"seq\":{}}}\n",
                    next(),
                    next()
                );
                chan.write_all(query.as_bytes()).unwrap();
                let mut lines = Lines::new();
                let mut listening = false;
                loop {
                    let Ok(mut got) = scm::recv(chan.as_fd(), lines.spare(), proto::Wait::Block)
                    else {
                        return;
                    };
                    if got.len == 0 {
                        return;
                    }
                    let mut fd = got.fds.take_first();
                    let mut out = Vec::new();
                    let mut stop = false;
                    lines.filled(got.len, |line| {
                        let v: serde_json::Value = serde_json::from_slice(line.unwrap()).unwrap();
                        if v["ack"] == 2 && !listening {
                            listening = true;
                            out.extend_from_slice(
                                b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"listening\",\"seq\":3}\n",
                            );
                        } else if v["cmd"] == "NODE_HANDLE" {
                            let conn = TcpStream::from(fd.take().expect("newconn carries its fd"));
                            out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
                            let reply = format!(
                                "{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{},\"accepted\":true,\"seq\":{}}}\n",
                                v["msg"]["seq"],
                                next()
                            );
                            out.extend_from_slice(reply.as_bytes());
                            chan.write_all(&out).unwrap();
                            out.clear();
                            serve(conn);
                            out.extend_from_slice(b"{\"lb_closed\":1}\n");
                        } else if v["act"] == "disconnect" {
                            stop = true;
                        }
                    });
                    let _ = chan.write_all(&out);
                    if stop {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// Attaches `n` proxy-mode workers: threads listening on loopback ports of
/// their own, calling `serve` on each connection they accept.
pub fn proxy_workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    (0..n)
        .map(|slot| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let (master, peer) = proto::pair().unwrap();
            attach(handle, slot, master, Some(peer), Mode::Proxy, port);
            let serve = serve.clone();
            std::thread::spawn(move || {
                // The first connection is lb's readiness probe.
                for conn in listener.incoming().skip(1) {
                    match conn {
                        Ok(s) => serve(s),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}
