//! What a Node worker says, line by line: handle ACKs and NACKs, the
//! answer to a `newconn`, `queryServer` (its `listen()`), `listening`, and
//! the app's own messages.

use std::net::IpAddr;

use super::Server;
use crate::config::Address;
use crate::dispatch::worker::State;
use crate::dispatch::{Dispatcher, Event};
use crate::policy::Slot;
use crate::proto::Malformed;
use crate::proto::node::{self, Answer, Bad, Line, NewConn, Query};

impl Dispatcher {
    pub(super) fn node_line(&mut self, index: usize, line: Result<&[u8], Bad>) {
        let Some(w) = self.workers.get(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let complain = |this: &mut Dispatcher, bad: Bad| {
            this.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::Node(bad),
            });
        };
        let line = match line {
            Ok(l) => l,
            Err(bad) => return complain(self, bad),
        };
        if line.is_empty() {
            return;
        }
        match node::parse(line) {
            Ok(Line::HandleAck) => {
                if let Some(f) = self.node(index).and_then(|n| n.flight.as_mut()) {
                    f.acked = true;
                }
            }
            Ok(Line::Reply { ack, accepted }) => {
                let Some(n) = self.node(index) else { return };
                match n.flight.take_if(|f| f.seq == ack) {
                    // Only an explicit `false` is a refusal; the worker
                    // took the fd otherwise.
                    Some(f) => self.node_answered(index, slot, f, accepted != Some(false)),
                    None => complain(self, Bad::UnknownAck(ack)),
                }
            }
            Ok(Line::HandleNack) => self.node_resend(index, slot),
            Ok(Line::Closed { n, accepted }) => {
                if accepted > 0 {
                    self.accepted(index, slot, accepted);
                }
                self.closed(index, slot, n)
            }
            Ok(Line::Listening) => self.ready(index, slot, pid),
            Ok(Line::Online | Line::Ignored) => {}
            Ok(Line::QueryServer { seq }) => self.node_query(index, slot, pid, line, seq),
            Ok(Line::Close) => self.node_close(index, slot, pid, line),
            Ok(Line::ExitedAfterDisconnect { seq }) => {
                let Some(n) = self.node(index) else { return };
                let reply = node::ack(seq, n.next_seq());
                self.node_write(index, &reply);
                self.leaving(index, slot, pid);
            }
            Ok(Line::Handle) => {
                self.node_write(index, node::HANDLE_ACK);
                let payload = serde_json::from_slice::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| serde_json::to_vec(&v["msg"]).ok())
                    .unwrap_or_else(|| line.to_vec());
                self.emit(Event::Message { slot, pid, payload });
            }
            Ok(Line::User) => {
                let payload = line.to_vec();
                self.emit(Event::Message { slot, pid, payload });
            }
            Err(bad) => complain(self, bad),
        }
    }

    /// The worker's `listen()`: served by the lb listeners on the port or
    /// path it asked for, or, when it asked for none of them, by those no
    /// other server of the worker asked for (reported back as asked, so
    /// Node's checks pass).
    fn node_query(&mut self, index: usize, slot: Slot, pid: u32, line: &[u8], seq: u64) {
        let Ok(query) = serde_json::from_slice::<Query<'_>>(line) else {
            return self.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::Node(Bad::NotJson),
            });
        };
        let asked = query.port.unwrap_or(0);
        let pipe = query.address_type.as_ref().and_then(|t| t.as_i64()) == Some(-1)
            || query.address.as_deref().is_some_and(|a| a.starts_with('/'));
        let udp = query.address_type.as_ref().is_some_and(|t| t.is_string());
        let wanted = if pipe {
            Ok(Asked::Path(query.address.as_deref().unwrap_or("?")))
        } else if udp {
            Err((
                libc::ENOTSUP,
                "a UDP bind() refused: lb balances TCP only".to_string(),
            ))
        } else if !(0..=i64::from(u16::MAX)).contains(&asked) {
            Err((libc::EINVAL, format!("listen() on port {asked} refused")))
        } else {
            Ok(Asked::Port(asked as u16))
        };
        // (Rare: a copy, so that the worker can be borrowed beside it.)
        let listeners = self.node.listeners.clone();
        let Some(n) = self.node(index) else { return };
        let judged = wanted.and_then(|w| {
            judge(&listeners, &n.servers, n.listener.is_some(), w).map(|claims| (w, claims))
        });
        let reply_seq = n.next_seq();
        let reply = match judged {
            Err((errno, text)) => {
                self.emit(Event::Note { slot, pid, text });
                let key = format!("lb:{asked}");
                node::answer(seq, reply_seq, &Answer::Refuse { key: &key, errno })
            }
            Ok((wanted, claims)) => {
                // The first `data` given goes to every worker, as Node's
                // primary does (TLS workers share their session ticket keys
                // through it; a TLS worker given `null` throws).
                let own = query.data.map(|d| d.get()).filter(|d| *d != "null");
                if self.node.data.is_none() {
                    self.node.data = own.map(str::to_string);
                }
                let data = self.node.data.clone().unwrap_or_else(|| "null".to_string());
                let Some(n) = self.node(index) else { return };
                let (key, port) = match wanted {
                    Asked::Port(p) => (format!("lb:{p}"), Some(p)),
                    Asked::Path(_) => (format!("lb:unix:{}", claims[0]), None),
                };
                let reply = match wanted {
                    // Kernel dispatch: the worker's own listener is its
                    // server, and it accepts by itself.
                    _ if n.listener.is_some() => None,
                    Asked::Path(_) => Some(node::answer(
                        seq,
                        reply_seq,
                        &Answer::ServePath {
                            key: &key,
                            data: &data,
                        },
                    )),
                    Asked::Port(asked) => {
                        let (ip, own) = sockname(&listeners, &n.servers, &claims);
                        Some(node::answer(
                            seq,
                            reply_seq,
                            &Answer::Serve {
                                key: &key,
                                data: &data,
                                address: &ip.to_string(),
                                ipv6: ip.is_ipv6(),
                                port: if asked > 0 { asked } else { own },
                            },
                        ))
                    }
                };
                let reply =
                    reply.ok_or_else(|| node::answer_with_server(seq, reply_seq, &key, &data));
                n.servers.push(Server {
                    newconn: NewConn::new(&key),
                    key,
                    port,
                    claims,
                });
                n.reroute(listeners.len());
                match reply {
                    Ok(reply) => reply,
                    Err(with_listener) => {
                        self.node_send_server(index, &with_listener);
                        return self.sync_view(slot);
                    }
                }
            }
        };
        self.node_write(index, &reply);
        self.sync_view(slot);
    }

    /// The worker closed the server of `key` (all of them when it names
    /// none): the others keep their listeners and take its.
    pub(super) fn node_close(&mut self, index: usize, slot: Slot, pid: u32, line: &[u8]) {
        let key = serde_json::from_slice::<CloseLine<'_>>(line)
            .ok()
            .and_then(|c| c.key);
        let listeners = self.node.listeners.len();
        let Some(n) = self.node(index) else { return };
        match key {
            Some(key) => n.servers.retain(|s| s.key != key),
            None => n.servers.clear(),
        }
        n.reroute(listeners);
        let none = n.servers.is_empty();
        let leaving = self.workers.get(index).map(|w| w.state) == Some(State::Ready);
        self.sync_view(slot);
        if none && leaving {
            self.emit(Event::Note {
                slot,
                pid,
                text: "closed its server: no new connections until it listens again".into(),
            });
        }
    }
}

/// What a `listen()` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked<'a> {
    /// A TCP port, 0 for any.
    Port(u16),
    /// A Unix socket path (absolute: Node resolves it).
    Path(&'a str),
}

impl std::fmt::Display for Asked<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Asked::Port(p) => write!(f, "port {p}"),
            Asked::Path(p) => write!(f, "path {p}"),
        }
    }
}

/// A worker's `close` of one server.
#[derive(serde::Deserialize)]
struct CloseLine<'a> {
    #[serde(borrow, default)]
    key: Option<std::borrow::Cow<'a, str>>,
}

/// Which of lb's `listeners` a new server asking for `asked` claims (none:
/// it takes those no other server claims), given the worker's `servers`;
/// or why it is refused (an errno and a reason naming lb's listeners).
fn judge(
    listeners: &[Address],
    servers: &[Server],
    kernel: bool,
    asked: Asked<'_>,
) -> Result<Vec<usize>, (i32, String)> {
    let claims: Vec<usize> = listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| match (l, asked) {
            (Address::Tcp(a), Asked::Port(p)) => p != 0 && a.port() == p,
            (Address::Unix(path), Asked::Path(q)) => path.as_path() == std::path::Path::new(q),
            _ => false,
        })
        .map(|(i, _)| i)
        .collect();
    let listing = || {
        listeners
            .iter()
            .map(Address::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let second = |why: String| format!("a second listen() ({asked}) refused: {why}");
    if let Asked::Path(path) = asked
        && claims.is_empty()
    {
        return Err((
            libc::ENOTSUP,
            format!(
                "listen() on the Unix socket {path} refused: lb listens on {}; listen on one \
                 of those, or give lb a listener unix:{path}",
                listing()
            ),
        ));
    }
    if servers.iter().any(|s| match asked {
        Asked::Port(p) => p != 0 && s.port == Some(p),
        Asked::Path(_) => s.port.is_none() && s.claims.iter().any(|c| claims.contains(c)),
    }) {
        return Err((
            libc::EADDRINUSE,
            second("the worker has a server there already".into()),
        ));
    }
    if kernel && !servers.is_empty() {
        return Err((
            libc::ENOTSUP,
            second("under kernel dispatch a worker has one server".into()),
        ));
    }
    let taken = |l: &usize| servers.iter().any(|s| s.claims.contains(l));
    if let Some(l) = claims.iter().find(|l| taken(l)) {
        return Err((
            libc::EADDRINUSE,
            second(format!(
                "another server of the worker serves lb's {}",
                listeners[*l]
            )),
        ));
    }
    if claims.is_empty() && !servers.is_empty() {
        if let Some(rest) = servers.iter().find(|s| s.claims.is_empty()) {
            let theirs = match rest.port {
                Some(p) => format!("its server on port {p}"),
                None => "another of its servers".to_string(),
            };
            return Err((
                libc::ENOTSUP,
                second(format!(
                    "it is none of lb's listeners ({}), and {theirs} takes those no other \
                     server asked for; a worker may have one server per listener, on its \
                     port or path",
                    listing()
                )),
            ));
        }
        if (0..listeners.len()).all(|l| taken(&l)) {
            return Err((
                libc::ENOTSUP,
                second(format!(
                    "each of lb's listeners ({}) has its server in the worker already",
                    listing()
                )),
            ));
        }
    }
    Ok(claims)
}

/// The address a TCP server is told it has: the first listener it claims,
/// else the first TCP one no other server claims, else lb's first TCP
/// one; and that listener's port (for a `listen(0)`).
fn sockname(listeners: &[Address], servers: &[Server], claims: &[usize]) -> (IpAddr, u16) {
    let taken = |l: usize| servers.iter().any(|s| s.claims.contains(&l));
    let tcp = |l: usize| listeners.get(l).and_then(Address::tcp);
    claims
        .iter()
        .find_map(|&l| tcp(l))
        .or_else(|| (0..listeners.len()).filter(|&l| !taken(l)).find_map(tcp))
        .or_else(|| (0..listeners.len()).find_map(tcp))
        .map_or((IpAddr::from([0, 0, 0, 0]), 0), |a| (a.ip(), a.port()))
}

#[cfg(test)]
mod tests {
    use super::super::NodeLink;
    use super::*;

    fn lbs() -> Vec<Address> {
        vec![
            Address::Tcp("127.0.0.1:8000".parse().unwrap()),
            Address::Tcp("127.0.0.1:8443".parse().unwrap()),
            Address::Unix("/run/app.sock".into()),
        ]
    }

    /// The servers a worker gets by listening on each of `asks` in turn
    /// (refusals left out), and each answer.
    fn listen(kernel: bool, asks: &[Asked<'_>]) -> (Vec<Server>, Vec<Result<Vec<usize>, i32>>) {
        let mut servers = Vec::new();
        let mut answers = Vec::new();
        for (i, &asked) in asks.iter().enumerate() {
            let got = judge(&lbs(), &servers, kernel, asked);
            if let Ok(claims) = &got {
                let key = format!("lb:{i}");
                servers.push(Server {
                    newconn: NewConn::new(&key),
                    key,
                    port: match asked {
                        Asked::Port(p) => Some(p),
                        Asked::Path(_) => None,
                    },
                    claims: claims.clone(),
                });
            }
            answers.push(got.map_err(|(errno, _)| errno));
        }
        (servers, answers)
    }

    #[test]
    fn each_listen_gets_its_listener_and_one_that_matches_none_the_rest() {
        use Asked::{Path, Port};
        let (_, got) = listen(false, &[Port(8000), Port(8443), Path("/run/app.sock")]);
        assert_eq!(got, [Ok(vec![0]), Ok(vec![1]), Ok(vec![2])]);
        // Every listener has its server: nothing left for a fourth.
        let (_, got) = listen(
            false,
            &[Port(8000), Port(8443), Path("/run/app.sock"), Port(0)],
        );
        assert_eq!(got[3], Err(libc::ENOTSUP));
        let (_, got) = listen(false, &[Port(3000), Port(8443)]);
        assert_eq!(got, [Ok(vec![]), Ok(vec![1])]);
        let (_, got) = listen(false, &[Port(3000), Port(3001)]);
        assert_eq!(got[1], Err(libc::ENOTSUP));
        let (_, got) = listen(false, &[Port(8000), Port(8000)]);
        assert_eq!(got[1], Err(libc::EADDRINUSE));
        let (_, got) = listen(false, &[Path("/run/app.sock"), Path("/run/app.sock")]);
        assert_eq!(got[1], Err(libc::EADDRINUSE));
        // A path lb does not listen on is refused, naming lb's listeners.
        let refused = judge(&lbs(), &[], false, Path("/tmp/other.sock")).unwrap_err();
        assert_eq!(refused.0, libc::ENOTSUP);
        assert!(refused.1.contains("unix:/run/app.sock"), "{}", refused.1);
        let (_, got) = listen(true, &[Port(8000), Port(8443)]);
        assert_eq!(got, [Ok(vec![0]), Err(libc::ENOTSUP)]);
        let why = judge(&lbs(), &listen(false, &[Port(3000)]).0, false, Port(9)).unwrap_err();
        assert!(
            why.1.starts_with("a second listen() (port 9) refused")
                && why
                    .1
                    .contains("127.0.0.1:8000, 127.0.0.1:8443, unix:/run/app.sock"),
            "{}",
            why.1
        );
    }

    #[test]
    fn every_listener_routes_to_a_server_of_the_worker() {
        use Asked::Port;
        let route = |servers: Vec<Server>| {
            let (a, _) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut n = NodeLink::new(a.into(), None);
            n.servers = servers;
            n.reroute(3);
            n.route.clone()
        };
        assert_eq!(route(listen(false, &[Port(8000)]).0), [0, 0, 0]);
        assert_eq!(route(listen(false, &[Port(8443), Port(3000)]).0), [1, 0, 1]);
        assert_eq!(route(listen(false, &[Port(3000), Port(8443)]).0), [0, 1, 0]);
        let (servers, _) = listen(false, &[Port(0), Port(8000)]);
        assert_eq!(
            sockname(&lbs(), &servers[..0], &[]),
            ("127.0.0.1".parse().unwrap(), 8000)
        );
        assert_eq!(
            sockname(&lbs(), &servers, &[]),
            ("127.0.0.1".parse().unwrap(), 8443)
        );
    }
}
