//! A worker's lines, as the master reads them: split whole off a bounded
//! buffer ([`Lines`]), decoded without allocating ([`parse`]), and the
//! rare `queryServer` parsed further ([`Query`]).

use serde::Deserialize;

use super::MAX_LINE;

/// The fields of a worker's line that the master acts on. Borrowed from the
/// line; unknown fields are skipped without allocating.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Head<'a> {
    #[serde(borrow)]
    pub cmd: Option<&'a str>,
    #[serde(borrow)]
    pub act: Option<&'a str>,
    pub ack: Option<u64>,
    pub seq: Option<u64>,
    pub accepted: Option<bool>,
    /// The preload's report: this many connections closed.
    pub lb_closed: Option<u64>,
    /// … and, under kernel dispatch, this many accepted.
    pub lb_accepted: Option<u64>,
}

/// One line from a worker, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The worker took the handle we sent.
    HandleAck,
    /// The handle arrived without its fd: send it again.
    HandleNack,
    /// The worker sent us a handle (`process.send(msg, socket)`): it must
    /// be ACKed or the worker's channel stalls; `line` is the envelope.
    Handle,
    /// A reply to our message `ack`; `accepted` for a `newconn`.
    Reply {
        ack: u64,
        accepted: Option<bool>,
    },
    Online,
    /// `listen()`: must be answered; the full line is parsed by the handler.
    QueryServer {
        seq: u64,
    },
    Listening,
    /// The worker closed its server.
    Close,
    /// The worker is leaving on its own; must be acked with `seq`.
    ExitedAfterDisconnect {
        seq: u64,
    },
    /// The preload's report: `n` closed, `accepted` accepted by the
    /// worker itself (kernel dispatch; 0 otherwise).
    Closed {
        n: u64,
        accepted: u64,
    },
    /// Anything else that is JSON: the app's `process.send(x)`.
    User,
    /// An internal message this master does not act on (ignored, as Node does).
    Ignored,
}

/// Why a worker's line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("line is not JSON")]
    NotJson,
    #[error("line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("{0} without a seq")]
    NoSeq(&'static str),
    #[error("reply to message {0}, which is not awaiting one")]
    UnknownAck(u64),
    #[error("handle sent {0} times and never received")]
    HandleLost(u8),
}

/// Decodes one line (without its `\n`).
pub fn parse(line: &[u8]) -> Result<Line, Bad> {
    let head: Head<'_> = match serde_json::from_slice(line) {
        Ok(h) => h,
        // Cold: not an object of the shape above. Any other JSON value is
        // a user message (Node delivers those to `process.on('message')`).
        Err(_) => {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                Ok(_) => Ok(Line::User),
                Err(_) => Err(Bad::NotJson),
            };
        }
    };
    let cmd = match head.cmd {
        Some(c) => c,
        None => {
            return Ok(match head.lb_closed {
                Some(n) => Line::Closed {
                    n,
                    accepted: head.lb_accepted.unwrap_or(0),
                },
                None => Line::User,
            });
        }
    };
    // Node's own test for an internal message: a `cmd` starting NODE_.
    if !(cmd.len() > 5 && cmd.starts_with("NODE_")) {
        return Ok(Line::User);
    }
    Ok(match cmd {
        "NODE_HANDLE_ACK" => Line::HandleAck,
        "NODE_HANDLE_NACK" => Line::HandleNack,
        "NODE_HANDLE" => Line::Handle,
        "NODE_CLUSTER" => match (head.act, head.ack) {
            (None, Some(ack)) => Line::Reply {
                ack,
                accepted: head.accepted,
            },
            (Some("online"), _) => Line::Online,
            (Some("queryServer"), _) => Line::QueryServer {
                seq: head.seq.ok_or(Bad::NoSeq("queryServer"))?,
            },
            (Some("listening"), _) => Line::Listening,
            (Some("close"), _) => Line::Close,
            (Some("exitedAfterDisconnect"), _) => Line::ExitedAfterDisconnect {
                seq: head.seq.ok_or(Bad::NoSeq("exitedAfterDisconnect"))?,
            },
            _ => Line::Ignored,
        },
        _ => Line::Ignored,
    })
}

/// Splits complete lines off the front of a worker's bytes; keeps the
/// tail. A fixed buffer: a line longer than it is skipped up to its `\n`.
/// (`Default` is an empty placeholder that owns no memory.)
#[derive(Default)]
pub struct Lines {
    buf: Box<[u8]>,
    /// Bytes held: `buf[..len]`.
    len: usize,
    /// Within an over-long line, discarding until its end.
    skipping: bool,
}

impl Lines {
    pub fn new() -> Lines {
        Lines {
            buf: vec![0; MAX_LINE].into_boxed_slice(),
            len: 0,
            skipping: false,
        }
    }

    /// Where the next read goes (never empty).
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Takes `n` bytes just read into [`Lines::spare`] and calls `each` on
    /// every complete line (without `\n`), or with `Err(TooLong)` once per
    /// over-long line. The incomplete tail is kept for the next read.
    pub fn filled(&mut self, n: usize, mut each: impl FnMut(Result<&[u8], Bad>)) {
        let end = self.len + n;
        let mut start = 0;
        let mut from = self.len;
        while let Some(i) = self.buf[from..end].iter().position(|&b| b == b'\n') {
            let nl = from + i;
            if self.skipping {
                self.skipping = false;
            } else {
                each(Ok(&self.buf[start..nl]));
            }
            start = nl + 1;
            from = start;
        }
        if start == 0 && end == self.buf.len() {
            // Full, and no line ended: drop what is held, skip to the next `\n`.
            if !self.skipping {
                each(Err(Bad::TooLong));
            }
            self.skipping = true;
            self.len = 0;
            return;
        }
        self.buf.copy_within(start..end, 0);
        self.len = end - start;
    }
}

// A buffer, not worth printing: its size says enough.
impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lines({} bytes held)", self.len)
    }
}

/// A worker's `queryServer` (its `listen()`), the fields lb looks at.
#[derive(Debug, Deserialize)]
pub struct Query<'a> {
    pub seq: u64,
    /// `null`, an IP, or a Unix socket path.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    /// 4 or 6 for TCP, -1 for a pipe, `"udp4"`/`"udp6"` for dgram.
    #[serde(rename = "addressType", default)]
    pub address_type: Option<serde_json::Value>,
    /// Echoed back (TLS workers share their ticket keys through it).
    #[serde(borrow, default)]
    pub data: Option<&'a serde_json::value::RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_node_parse() {
        // Captured from Node 20 (docs/node.md).
        let cases: &[(&str, Line)] = &[
            (r#"{"cmd":"NODE_HANDLE_ACK"}"#, Line::HandleAck),
            (r#"{"cmd":"NODE_HANDLE_NACK"}"#, Line::HandleNack),
            (
                r#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":true,"seq":3}"#,
                Line::Reply {
                    ack: 7,
                    accepted: Some(true),
                },
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","ack":8,"accepted":false,"seq":4}"#,
                Line::Reply {
                    ack: 8,
                    accepted: Some(false),
                },
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#,
                Line::Online,
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":8000,"addressType":4,"backlog":0,"seq":1}"#,
                Line::QueryServer { seq: 1 },
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":null,"port":8000,"addressType":4,"backlog":0,"seq":2}"#,
                Line::Listening,
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"close","key":"lb","seq":6}"#,
                Line::Close,
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":5}"#,
                Line::ExitedAfterDisconnect { seq: 5 },
            ),
            (
                r#"{"cmd":"NODE_CLUSTER","act":"somethingNew","seq":9}"#,
                Line::Ignored,
            ),
            (r#"{"cmd":"NODE_SOCKET_THING"}"#, Line::Ignored),
            (r#"{"lb_closed":3}"#, Line::Closed { n: 3, accepted: 0 }),
            (
                r#"{"lb_closed":1,"lb_accepted":4}"#,
                Line::Closed { n: 1, accepted: 4 },
            ),
            (r#"{"hits":3,"cmd":"mine"}"#, Line::User),
            (r#"{"cmd":"NODE_"}"#, Line::User),
            (r#"[1,2]"#, Line::User),
            (r#""hello""#, Line::User),
            (r#"{"cmd":5}"#, Line::User),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text.as_bytes()).as_ref(), Ok(want), "{text}");
        }
        assert_eq!(parse(b"{not json"), Err(Bad::NotJson));
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"queryServer"}"#),
            Err(Bad::NoSeq("queryServer"))
        );
    }

    #[test]
    fn lines_are_split_whole_and_bounded() {
        let mut l = Lines::new();
        let mut got: Vec<Result<Vec<u8>, Bad>> = Vec::new();
        let feed = |l: &mut Lines, bytes: &[u8], got: &mut Vec<_>| {
            l.spare()[..bytes.len()].copy_from_slice(bytes);
            l.filled(bytes.len(), |r| got.push(r.map(<[u8]>::to_vec)));
        };
        feed(&mut l, b"{\"a\":1}\n{\"b\"", &mut got);
        feed(&mut l, b":2}\n\n", &mut got);
        assert_eq!(
            got,
            vec![
                Ok(b"{\"a\":1}".to_vec()),
                Ok(b"{\"b\":2}".to_vec()),
                Ok(vec![])
            ]
        );
        got.clear();
        // An over-long line: reported once, skipped to its end, then normal.
        let chunk = vec![b'x'; 40_000];
        feed(&mut l, &chunk, &mut got);
        let room = l.spare().len();
        feed(&mut l, &chunk[..room], &mut got);
        feed(&mut l, &chunk, &mut got);
        feed(&mut l, b"tail\n{\"c\":3}\n", &mut got);
        assert_eq!(got, vec![Err(Bad::TooLong), Ok(b"{\"c\":3}".to_vec())]);
    }
}
