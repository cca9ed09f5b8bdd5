//! What a Node worker says, line by line: handle ACKs and NACKs, the
//! answer to a `newconn`, `queryServer` (its `listen()`), `listening`, and
//! the app's own messages.

use super::Server;
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
            Ok(Line::Close) => {
                let Some(n) = self.node(index) else { return };
                n.server = None;
                let leaving = self.workers.get(index).map(|w| w.state) == Some(State::Ready);
                self.sync_view(slot);
                if leaving {
                    self.emit(Event::Note {
                        slot,
                        pid,
                        text: "closed its server: no new connections until it listens again".into(),
                    });
                }
            }
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

    /// The worker's `listen()`: lb's listener is its server, whatever port
    /// it asked for (reported back as asked, so Node's checks pass).
    fn node_query(&mut self, index: usize, slot: Slot, pid: u32, line: &[u8], seq: u64) {
        let Ok(query) = serde_json::from_slice::<Query<'_>>(line) else {
            return self.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::Node(Bad::NotJson),
            });
        };
        let front = self.node.front;
        let asked = query.port.unwrap_or(0);
        let pipe = query.address_type.as_ref().and_then(|t| t.as_i64()) == Some(-1)
            || query.address.as_deref().is_some_and(|a| a.starts_with('/'));
        let udp = query.address_type.as_ref().is_some_and(|t| t.is_string());
        let Some(n) = self.node(index) else { return };
        let serving = n.server.as_ref().map(|s| s.port);
        let refusal = if pipe {
            Some((
                libc::ENOTSUP,
                format!(
                    "listen() on the Unix socket {} refused: lb serves TCP on {front}; \
                     listen on a TCP port instead",
                    query.address.as_deref().unwrap_or("?")
                ),
            ))
        } else if udp {
            Some((
                libc::ENOTSUP,
                "a UDP bind() refused: lb balances TCP only".to_string(),
            ))
        } else if !(0..=i64::from(u16::MAX)).contains(&asked) {
            Some((libc::EINVAL, format!("listen() on port {asked} refused")))
        } else {
            serving.map(|port| {
                (
                    if asked as u16 == port {
                        libc::EADDRINUSE
                    } else {
                        libc::ENOTSUP
                    },
                    format!(
                        "a second listen() (port {asked}) refused: lb gives each worker one \
                         server, the one on port {port}"
                    ),
                )
            })
        };
        let reply_seq = n.next_seq();
        let key = format!("lb:{asked}");
        let reply = match refusal {
            Some((errno, text)) => {
                self.emit(Event::Note { slot, pid, text });
                node::answer(seq, reply_seq, &Answer::Refuse { key: &key, errno })
            }
            None => {
                // The first `data` given goes to every worker, as Node's
                // primary does (TLS workers share their session ticket keys
                // through it; a TLS worker given `null` throws).
                let own = query.data.map(|d| d.get()).filter(|d| *d != "null");
                if self.node.data.is_none() {
                    self.node.data = own.map(str::to_string);
                }
                let data = self.node.data.clone().unwrap_or_else(|| "null".to_string());
                let port = if asked > 0 {
                    asked as u16
                } else {
                    front.port()
                };
                if let Some(n) = self.node(index) {
                    n.server = Some(Server {
                        port,
                        newconn: NewConn::new(&key),
                    });
                    // Kernel dispatch: the worker's own listener is its
                    // server, and it accepts by itself.
                    if n.listener.is_some() {
                        let line = node::answer_with_server(seq, reply_seq, &key, &data);
                        self.node_send_server(index, &line);
                        return self.sync_view(slot);
                    }
                }
                node::answer(
                    seq,
                    reply_seq,
                    &Answer::Serve {
                        key: &key,
                        data: &data,
                        address: &front.ip().to_string(),
                        ipv6: front.is_ipv6(),
                        port,
                    },
                )
            }
        };
        self.node_write(index, &reply);
        self.sync_view(slot);
    }
}
