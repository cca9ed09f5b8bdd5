//! A load generator that counts every failure, as a demanding client would:
//! a refused connect, a reset, an EOF before a whole response, a timeout,
//! anything but a `200`. Keep-alive clients reuse their connection until
//! the server says `Connection: close` (then open a new one, which is not
//! a failure); `Connection: close` clients open one per request.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long one response may take before it counts as a timeout.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures described in the tally (the rest are only counted).
const DESCRIBED: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    KeepAlive,
    Close,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests answered with a whole `200`.
    pub ok: u64,
    pub failed: u64,
    /// Of `failed`: connects refused (nothing was listening, so nothing
    /// was accepted and lost).
    pub refused: u64,
    /// Connections opened.
    pub connections: u64,
    /// The first failure of each kind (a few), for the assertion message.
    pub first: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.refused += other.refused;
        self.connections += other.connections;
        for f in other.first {
            if self.first.len() < DESCRIBED && !self.first.contains(&f) {
                self.first.push(f);
            }
        }
    }

    /// Counts a failure; the first few of each kind are described.
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.first.len() < DESCRIBED && !self.first.contains(&what) {
            self.first.push(what);
        }
    }
}

/// Clients running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// `clients` clients, each one request at a time, until `stop` (or,
    /// with `limit`, until that many requests were sent in all).
    pub fn start(addr: SocketAddr, clients: usize, style: Style, limit: Option<u64>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let budget = Arc::new(AtomicI64::new(
            limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap()),
        ));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, budget) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&budget));
                std::thread::spawn(move || client(addr, style, &stop, &ok, &budget))
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more requests have been answered.
    pub fn wait_more(&self, n: u64) {
        let target = self.ok() + n;
        let deadline = std::time::Instant::now() + super::WAIT;
        while self.ok() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the load stalled at {} requests",
                self.ok()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients (each finishes the request it is in) and adds up.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for a `limit` given to `start` to be used up, and adds up.
    pub fn finish(self) -> Tally {
        self.join()
    }

    fn join(self) -> Tally {
        let mut total = Tally::default();
        for t in self.threads {
            total.add(t.join().expect("a client thread panicked"));
        }
        total
    }
}

/// `clients` clients of `style` load `lb` (running `workers` at generation
/// `reloads.start() - 1`) while it is reloaded to each generation in
/// `reloads`; what they saw.
pub fn reloads_under_load(
    lb: &super::Lb,
    clients: usize,
    style: Style,
    workers: usize,
    reloads: std::ops::RangeInclusive<u64>,
) -> Tally {
    let load = Load::start(lb.addr, clients, style, None);
    load.wait_more(200);
    for generation in reloads {
        lb.reload(workers, generation);
        load.wait_more(100);
    }
    load.stop()
}

fn client(
    addr: SocketAddr,
    style: Style,
    stop: &AtomicBool,
    ok: &AtomicU64,
    budget: &AtomicI64,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<TcpStream> = None;
    let request: &[u8] = match style {
        Style::KeepAlive => b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n",
        Style::Close => b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
    };
    while !stop.load(Ordering::Relaxed) && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
        let reused = conn.is_some();
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr) {
                Ok(s) => {
                    tally.connections += 1;
                    let _ = s.set_read_timeout(Some(RESPONSE_TIMEOUT));
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(e) => {
                    if e.kind() == ErrorKind::ConnectionRefused {
                        tally.refused += 1;
                    }
                    tally.fail(format!("connect: {e}"));
                    // Nothing listens (yet, or any more): do not spin.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            },
        };
        if let Err(e) = s.write_all(request) {
            tally.fail(format!("write (reused connection: {reused}): {e}"));
            continue;
        }
        match read_response(&mut s) {
            Ok(keep) => {
                tally.ok += 1;
                ok.fetch_add(1, Ordering::Relaxed);
                if keep && style == Style::KeepAlive {
                    conn = Some(s);
                }
            }
            Err(e) => tally.fail(format!("{e} (reused connection: {reused})")),
        }
    }
    tally
}

/// Reads one whole response; whether the connection may be reused.
fn read_response(s: &mut TcpStream) -> Result<bool, String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err("EOF before a response".into()),
            Ok(0) => return Err("EOF in the middle of a response head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no response in {RESPONSE_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status_ok = head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200");
    let http10 = head.starts_with("http/1.0");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let close = match header("connection:") {
        Some(v) => v.contains("close"),
        None => http10,
    };
    let mut body = buf.len() - head_end;
    match header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) => {
            while body < len {
                match s.read(&mut chunk) {
                    Ok(0) => return Err(format!("EOF after {body} of {len} body bytes")),
                    Ok(n) => body += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("read body: {e}")),
                }
            }
        }
        // No length: the body ends with the connection.
        None => loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read body to EOF: {e}")),
            }
        },
    }
    if !status_ok {
        let line = head.lines().next().unwrap_or("").to_string();
        return Err(format!("status {line:?}"));
    }
    Ok(!close)
}
