//! A small HTTP/1.1 client for the hello workers' answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::WAIT;

/// One HTTP/1.1 GET on a new connection with `Connection: close`; the body.
pub fn get(addr: SocketAddr, path: &str) -> String {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path} via {addr}: {e}"))
}

pub fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )?;
    read_body(s)
}

/// Opens a connection and sends `GET /` with `Connection: close`, without
/// reading the answer (to hold many requests in flight at once).
pub fn send_request(addr: SocketAddr) -> TcpStream {
    send_request_to(addr, "/")
}

/// `send_request` for `path`.
pub fn send_request_to(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

/// `try_get` through the Unix socket at `socket` (one of lb's listeners).
pub fn try_get_unix(socket: &std::path::Path, path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )?;
    read_body(s)
}

/// Reads a whole `Connection: close` response; the body of a 200.
pub fn read_body(mut s: impl Read) -> std::io::Result<String> {
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        // HTTP/1.0 too: Python's http.server answers with it.
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!("bad response {resp:?}"))),
    }
}

/// A kept-alive connection for several requests.
pub struct KeepAlive {
    pub stream: TcpStream,
}

impl KeepAlive {
    pub fn open(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        KeepAlive { stream }
    }

    /// One request; reads exactly one response (Content-Length framed).
    pub fn get(&mut self, path: &str) -> String {
        write!(self.stream, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(
                self.stream.read(&mut byte).unwrap(),
                1,
                "connection closed early"
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("Content-Length");
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }
}

/// The slot in a hello body: `hello from worker <slot> (pid <pid>)`.
pub fn slot_of(body: &str) -> usize {
    body.strip_prefix("hello from worker ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a hello body: {body:?}"))
}

/// The pid in a hello body.
pub fn pid_of(body: &str) -> u32 {
    body.split("(pid ")
        .nth(1)
        .and_then(|r| r.trim_end().strip_suffix(')'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a hello body: {body:?}"))
}

/// Per-slot counts of `n` sequential requests.
pub fn split(addr: SocketAddr, slots: usize, n: usize) -> Vec<usize> {
    let mut count = vec![0; slots];
    for _ in 0..n {
        count[slot_of(&get(addr, "/"))] += 1;
    }
    count
}

/// Requests (new connection each) in a loop on 4 threads until `stop`;
/// each thread returns (ok, failed).
pub fn looping_clients(
    addr: SocketAddr,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, u64)>> {
    (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match try_get(addr, "/") {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}
