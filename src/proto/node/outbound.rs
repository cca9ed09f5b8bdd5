//! The lines lb writes to a Node worker. The per-connection one
//! ([`NewConn`]) is formatted once and only has its seq (and the client's
//! address, behind a balancer) rewritten.

use std::io::Write;
use std::net::SocketAddr;

/// The `newconn` line for one worker, formatted once per server key; each
/// hand-off writes only its seq in (no allocation: capacity is reserved).
pub struct NewConn {
    line: Vec<u8>,
    prefix: usize,
}

// A buffer, not worth printing: its size says enough.
impl std::fmt::Debug for NewConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewConn({} bytes)", self.prefix)
    }
}

impl NewConn {
    const SUFFIX: &'static [u8] = b"}}\n";
    /// Room for the client's address: `,"lb_peer":{…}` is at most 110
    /// bytes (an IPv6 address is at most 45 characters).
    const PEER_ROOM: usize = 128;

    /// For the server `key` (a JSON string without escapes, as lb makes them).
    pub fn new(key: &str) -> NewConn {
        let mut line = Vec::with_capacity(128 + Self::PEER_ROOM + key.len());
        line.extend_from_slice(
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":""#,
        );
        line.extend_from_slice(key.as_bytes());
        line.extend_from_slice(br#"","seq":"#);
        let prefix = line.len();
        NewConn { line, prefix }
    }

    /// The line for message `seq`.
    #[inline]
    pub fn line(&mut self, seq: u64) -> &[u8] {
        self.line_with_peer(seq, None)
    }

    /// The line for message `seq`, with the client's address (from a PROXY
    /// header) as `"lb_peer":{"address":…,"port":…,"family":…}`, which
    /// Node's cluster code ignores and lb's preload gives the socket
    /// (`socket.remoteAddress`); `None` writes the line [`NewConn::line`] does.
    #[inline]
    pub fn line_with_peer(&mut self, seq: u64, peer: Option<SocketAddr>) -> &[u8] {
        self.line.truncate(self.prefix);
        let mut digits = [0u8; 20];
        let text = decimal(seq, &mut digits);
        self.line.extend_from_slice(text);
        if let Some(peer) = peer {
            let family = if peer.is_ipv4() { "IPv4" } else { "IPv6" };
            // Into reserved capacity: no allocation. An address's text
            // needs no JSON escaping.
            let _ = write!(
                self.line,
                r#","lb_peer":{{"address":"{}","port":{},"family":"{family}"}}"#,
                peer.ip(),
                peer.port()
            );
        }
        self.line.extend_from_slice(Self::SUFFIX);
        &self.line
    }
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `{"cmd":"NODE_HANDLE_ACK"}`.
pub const HANDLE_ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";

/// The ack a worker's `exitedAfterDisconnect` waits for.
pub fn ack(ack: u64, seq: u64) -> Vec<u8> {
    format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{ack},\"seq\":{seq}}}\n").into_bytes()
}

/// Graceful stop: the worker closes its servers, finishes its connections,
/// closes the channel.
pub fn disconnect(seq: u64) -> Vec<u8> {
    format!("{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":{seq}}}\n").into_bytes()
}

/// A user message (`process.on('message')`): `payload` as is when it is
/// one line of JSON, else as a JSON string.
pub fn user(payload: &[u8]) -> Vec<u8> {
    let is_json = !payload.contains(&b'\n')
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok();
    let mut line = if is_json {
        payload.to_vec()
    } else {
        serde_json::to_vec(&String::from_utf8_lossy(payload)).expect("a string serializes")
    };
    line.push(b'\n');
    line
}

/// How a `queryServer` is answered.
pub enum Answer<'a> {
    /// Round-robin: connections come from the master. `port` is what the
    /// app asked for (or the front port when it asked for 0).
    Serve {
        key: &'a str,
        data: &'a str,
        address: &'a str,
        ipv6: bool,
        port: u16,
    },
    /// A Unix socket path: served, without a `sockname` (as Node's primary
    /// answers a path), so that `server.address()` gives the path.
    ServePath { key: &'a str, data: &'a str },
    /// The app's `listen()` fails with this errno (positive, e.g. `libc::ENOTSUP`).
    Refuse { key: &'a str, errno: i32 },
}

/// The reply to `queryServer` `ack` that carries the worker's own server
/// (sent with the listener's fd, as Node's primary does under
/// `SCHED_NONE`): the worker accepts from it itself.
pub fn answer_with_server(ack: u64, seq: u64, key: &str, data: &str) -> Vec<u8> {
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_CLUSTER\",\
         \"errno\":null,\"key\":\"{key}\",\"ack\":{ack},\"data\":{data},\"seq\":{seq}}}}}\n"
    )
    .into_bytes()
}

/// The reply to `queryServer` `ack`.
pub fn answer(ack: u64, seq: u64, answer: &Answer<'_>) -> Vec<u8> {
    let text = match answer {
        Answer::Serve {
            key,
            data,
            address,
            ipv6,
            port,
        } => {
            let family = if *ipv6 { "IPv6" } else { "IPv4" };
            let address = serde_json::to_string(address).expect("a string serializes");
            format!(
                "{{\"cmd\":\"NODE_CLUSTER\",\"errno\":null,\"key\":\"{key}\",\"ack\":{ack},\
                 \"data\":{data},\"sockname\":{{\"address\":{address},\"family\":\"{family}\",\
                 \"port\":{port}}},\"seq\":{seq}}}\n"
            )
        }
        Answer::ServePath { key, data } => format!(
            "{{\"cmd\":\"NODE_CLUSTER\",\"errno\":null,\"key\":\"{key}\",\"ack\":{ack},\
             \"data\":{data},\"seq\":{seq}}}\n"
        ),
        Answer::Refuse { key, errno } => format!(
            "{{\"cmd\":\"NODE_CLUSTER\",\"errno\":{},\"key\":\"{key}\",\"ack\":{ack},\
             \"data\":null,\"seq\":{seq}}}\n",
            -errno
        ),
    };
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::Query;
    use super::*;

    #[test]
    fn newconn_line_is_nodes_own() {
        let mut n = NewConn::new("lb:8000");
        let want = r#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"lb:8000","seq":1}}"#;
        assert_eq!(n.line(1), format!("{want}\n").as_bytes());
        let line = n.line(18_446_744_073_709_551_615).to_vec();
        assert!(line.ends_with(b"\"seq\":18446744073709551615}}\n"));
        let cap = n.line.capacity();
        for s in [0, 9, 10, 99, 100, 123_456_789] {
            let l = n.line(s).to_vec();
            let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
            assert_eq!(v["msg"]["seq"], s);
        }
        assert_eq!(
            n.line.capacity(),
            cap,
            "formatting a seq must not grow the buffer"
        );
    }

    #[test]
    fn newconn_carries_the_client_without_growing() {
        let mut n = NewConn::new("lb:8000");
        let cap = n.line.capacity();
        let v4: SocketAddr = "203.0.113.7:4242".parse().unwrap();
        let v: serde_json::Value = serde_json::from_slice(n.line_with_peer(7, Some(v4))).unwrap();
        assert_eq!(
            v["msg"]["lb_peer"],
            serde_json::json!({"address": "203.0.113.7", "port": 4242, "family": "IPv4"})
        );
        assert_eq!(
            (v["msg"]["seq"].as_u64(), v["msg"]["act"].as_str()),
            (Some(7), Some("newconn"))
        );
        let widest: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535"
            .parse()
            .unwrap();
        let l = n.line_with_peer(u64::MAX, Some(widest)).to_vec();
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["msg"]["lb_peer"]["family"], "IPv6");
        assert_eq!(v["msg"]["lb_peer"]["port"], 65535);
        assert_eq!(n.line.capacity(), cap, "a peer must not grow the buffer");
        // Without one, the line is Node's own.
        let plain = n.line(1).to_vec();
        assert_eq!(n.line_with_peer(1, None), &plain[..]);
    }

    #[test]
    fn replies_are_what_node_expects() {
        let ok = answer(
            1,
            0,
            &Answer::Serve {
                key: "lb:8000",
                data: "null",
                address: "127.0.0.1",
                ipv6: false,
                port: 8000,
            },
        );
        assert_eq!(
            String::from_utf8(ok).unwrap(),
            "{\"cmd\":\"NODE_CLUSTER\",\"errno\":null,\"key\":\"lb:8000\",\"ack\":1,\"data\":null,\
             \"sockname\":{\"address\":\"127.0.0.1\",\"family\":\"IPv4\",\"port\":8000},\"seq\":0}\n"
        );
        let no = answer(
            2,
            1,
            &Answer::Refuse {
                key: "lb:9000",
                errno: libc::ENOTSUP,
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&no).unwrap();
        assert_eq!(
            (v["errno"].as_i64(), v["ack"].as_u64()),
            (Some(-95), Some(2))
        );
        let path = answer(
            3,
            2,
            &Answer::ServePath {
                key: "lb:unix:1",
                data: "null",
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&path).unwrap();
        assert_eq!(
            (v["errno"].is_null(), v["key"].as_str(), v.get("sockname")),
            (true, Some("lb:unix:1"), None)
        );
        assert_eq!(user(b"{\"x\":1}"), b"{\"x\":1}\n");
        assert_eq!(user(b"reload now"), b"\"reload now\"\n");
        let q: Query<'_> = serde_json::from_slice(
            br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":{"ticketKeys":"AAAA"},"address":"/tmp/s","port":null,"addressType":-1,"backlog":511,"seq":1}"#,
        )
        .unwrap();
        assert_eq!((q.seq, q.address.as_deref()), (1, Some("/tmp/s")));
        assert_eq!(q.data.unwrap().get(), r#"{"ticketKeys":"AAAA"}"#);
    }
}
