//! The PROXY protocol (docs/proxy-protocol.md), master's side: headers
//! from curl (`--haproxy-protocol`, v1), HAProxy (`send-proxy`,
//! `send-proxy-v2`) and raw sockets (v2 with TLVs, LOCAL, malformed,
//! oversized, slow), read and removed by lb, the client's address handed to
//! native workers in the CONN payload; untrusted sources; proxy mode's
//! `send_proxy`; the start-time refusals.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A native worker that says READY with `PEER_ADDRESS` (flag 2) unless its
/// first argument is `0`, and answers each request with the CONN's payload
/// and the request's first line (which must not be a PROXY header).
const PEER_WORKER: &str = r#"
flags = int(sys.argv[1]) if len(sys.argv) > 1 else 2
send(16, flags)
while True:
    msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)
    if not msg or msg[1] == 2:
        break
    if msg[1] != 1 or len(fds) != 1:
        continue
    peer = msg[16:].decode()
    with socket.socket(fileno=fds[0]) as c:
        c.setblocking(True)
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                break
            req += chunk
        first = req.split(b"\r\n", 1)[0].decode(errors="replace")
        body = ("peer=%s first=%s\n" % (peer, first)).encode()
        try:
            c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass  # a health check that did not wait
    send(17, 1)
"#;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

fn peer_worker(dir: &std::path::Path) -> String {
    python_worker(dir, "peer.py", PEER_WORKER)
}

/// lb with `args`, 2 peer workers (READY flags `flags`).
fn lb_with(name: &str, args: &[&str], flags: &str) -> Lb {
    let dir = scratch(name);
    let worker = peer_worker(&dir);
    let mut full = vec!["--workers", "2"];
    full.extend_from_slice(args);
    full.extend(["--", "python3", worker.as_str(), flags]);
    Lb::start(&full, &[], 2)
}

/// Sends `bytes` on a new connection and reads to EOF: the body, or what
/// came back (empty when lb closed it).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // lb may have closed it already (an untrusted source).
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

fn with_get(header: &[u8]) -> Vec<u8> {
    [header, GET].concat()
}

/// A v2 header: `command` 0 (LOCAL) or 1 (PROXY), `family` (0x11 TCP over
/// IPv4, 0x21 over IPv6, 0 unspecified), its body (addresses, TLVs).
fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

/// 203.0.113.7:4242 → 10.0.0.1:80, with AWS's VPC endpoint TLV (0xEA)
/// and a NOOP one.
fn v2_from_203_with_tlvs() -> Vec<u8> {
    let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1];
    body.extend_from_slice(&4242u16.to_be_bytes());
    body.extend_from_slice(&80u16.to_be_bytes());
    body.extend_from_slice(&[0xEA, 0, 13, 0x01]);
    body.extend_from_slice(b"vpce-0123456");
    body.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]);
    v2(1, 0x11, &body)
}

pub(crate) fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// HAProxy in front of `backend` on `port` (bound on `bind`), with
/// `server_opts` on its one server line; ended by pid when dropped.
pub(crate) struct Haproxy(Child);

impl Haproxy {
    /// `backend` as HAProxy's `server` line takes it: `127.0.0.1:8000`,
    /// `unix@/path`.
    pub(crate) fn start(
        dir: &std::path::Path,
        bind: &str,
        backend: impl std::fmt::Display,
        server_opts: &str,
    ) -> Haproxy {
        let cfg = dir.join(format!(
            "haproxy-{}.cfg",
            bind.replace([':', '@', '.'], "_")
        ));
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 256\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 20s\n  timeout server 20s\n\
                 frontend f\n  bind {bind}\n  default_backend b\n\
                 backend b\n  server lb {backend} {server_opts}\n"
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        Haproxy(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        send_signal(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to `addr` until it accepts (bounded), then GETs through it;
/// the body, and the client's own address.
fn get_through(addr: SocketAddr) -> (String, SocketAddr) {
    let deadline = Instant::now() + WAIT;
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "{addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(GET).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    (out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(), me)
}

#[test]
fn curl_and_raw_v1_headers_give_the_worker_the_client_address() {
    let lb = lb_with(
        "pp-v1",
        &["--proxy-protocol", "v1", "--proxy-trusted", "127.0.0.0/8"],
        "2",
    );
    // curl's header names its own end of the connection.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--haproxy-protocol"])
        .arg(format!("http://{}/", lb.addr))
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.starts_with("peer=127.0.0.1:"), "{body}");
    assert!(body.contains("first=GET / HTTP/1.1"), "{body}");
    // A client elsewhere, as a balancer says it.
    let body = exchange(
        lb.addr,
        &with_get(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n"),
    );
    assert_eq!(body, "peer=203.0.113.7:4242 first=GET / HTTP/1.1\n");
    let body = exchange(
        lb.addr,
        &with_get(b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n"),
    );
    assert_eq!(body, "peer=[2001:db8::7]:4242 first=GET / HTTP/1.1\n");
    // UNKNOWN (a health check): served, no address.
    let body = exchange(lb.addr, &with_get(b"PROXY UNKNOWN\r\n"));
    assert_eq!(body, "peer= first=GET / HTTP/1.1\n");
    // Under v1 only, a v2 header is malformed.
    assert_eq!(exchange(lb.addr, &with_get(&v2_from_203_with_tlvs())), "");
    let s = lb.status();
    let p = &s["proxy_headers"];
    assert_eq!(p["v1"], 4, "{p}");
    assert_eq!(p["local"], 1, "{p}");
    assert_eq!(p["failures"]["malformed"], 1, "{p}");
}

#[test]
fn v2_headers_with_tlvs_and_local_ones_are_read_to_the_byte() {
    let lb = lb_with(
        "pp-v2",
        &[
            "--proxy-protocol",
            "any",
            "--proxy-trusted",
            "127.0.0.1,::1",
        ],
        "2",
    );
    let body = exchange(lb.addr, &with_get(&v2_from_203_with_tlvs()));
    assert_eq!(body, "peer=203.0.113.7:4242 first=GET / HTTP/1.1\n");
    let mut v6 = Vec::new();
    v6.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v6.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v6.extend_from_slice(&[0x10, 0x92, 0x01, 0xbb]);
    let body = exchange(lb.addr, &with_get(&v2(1, 0x21, &v6)));
    assert_eq!(body, "peer=[2001:db8::7]:4242 first=GET / HTTP/1.1\n");
    // LOCAL, as health checks send: served without an address.
    let body = exchange(lb.addr, &with_get(&v2(0, 0, &[])));
    assert_eq!(body, "peer= first=GET / HTTP/1.1\n");
    // Header and request in separate writes (a header that waits in the
    // poll), and the header itself split.
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let h = v2_from_203_with_tlvs();
    s.write_all(&h[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&h[10..]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(GET).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(
        out.ends_with("peer=203.0.113.7:4242 first=GET / HTTP/1.1\n"),
        "{out}"
    );
    let p = &lb.status()["proxy_headers"];
    assert_eq!(
        (p["v2"].as_u64(), p["local"].as_u64()),
        (Some(4), Some(1)),
        "{p}"
    );
}

#[test]
fn haproxy_send_proxy_v1_and_v2_name_the_real_client() {
    if !have("haproxy") {
        eprintln!("haproxy is not installed: skipped (apt-get install haproxy)");
        return;
    }
    let dir = scratch("pp-haproxy");
    let lb = lb_with(
        "pp-haproxy-lb",
        &["--proxy-protocol", "any", "--proxy-trusted", "127.0.0.1"],
        "2",
    );
    for opts in ["send-proxy", "send-proxy-v2"] {
        let port = free_port();
        let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _h = Haproxy::start(&dir, &front.to_string(), lb.addr, opts);
        for _ in 0..5 {
            let (body, me) = get_through(front);
            assert_eq!(body, format!("peer={me} first=GET / HTTP/1.1\n"), "{opts}");
        }
    }
    // A client on IPv6 (if this machine has ::1): haproxy still reaches lb
    // over IPv4, and says the client's v6 address.
    if TcpListener::bind("[::1]:0").is_ok() {
        let port = TcpListener::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let front: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let _h = Haproxy::start(&dir, &format!("ipv6@::1:{port}"), lb.addr, "send-proxy-v2");
        let (body, me) = get_through(front);
        assert!(me.is_ipv6());
        assert_eq!(body, format!("peer={me} first=GET / HTTP/1.1\n"));
    }
    let p = &lb.status()["proxy_headers"];
    assert!(
        p["v1"].as_u64().unwrap() >= 5 && p["v2"].as_u64().unwrap() >= 5,
        "{p}"
    );
    assert_eq!(p["failures"]["malformed"], 0, "{p}");
}

#[test]
fn bad_headers_are_closed_and_counted_while_good_clients_are_served() {
    let lb = lb_with(
        "pp-bad",
        &[
            "--proxy-protocol",
            "any",
            "--proxy-trusted",
            "127.0.0.1",
            "--proxy-header-timeout",
            "400ms",
            "--metrics",
            "127.0.0.1:0",
        ],
        "2",
    );
    // A good client all along: none of the bad ones may disturb it.
    let addr = lb.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut bad) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = exchange(
                    addr,
                    &with_get(b"PROXY TCP4 198.51.100.1 127.0.0.1 1 80\r\n"),
                );
                if body == "peer=198.51.100.1:1 first=GET / HTTP/1.1\n" {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            (ok, bad)
        })
    };
    // Slow: half a header, then nothing. Held open across the others.
    let mut slow = TcpStream::connect(lb.addr).unwrap();
    slow.write_all(b"PROXY TCP4 203.0.").unwrap();
    let started = Instant::now();
    // Malformed: no header at all, a bad address, a bad v2 version.
    assert_eq!(exchange(lb.addr, GET), "");
    assert_eq!(
        exchange(
            lb.addr,
            &with_get(b"PROXY TCP4 1.2.3.999 127.0.0.1 1 80\r\n")
        ),
        ""
    );
    let mut bad_version = v2_from_203_with_tlvs();
    bad_version[12] = 0x31;
    assert_eq!(exchange(lb.addr, &with_get(&bad_version)), "");
    // Oversized: a v2 length past 4096, a v1 line past 107 bytes.
    let mut big = v2(1, 0x11, &[0; 12]);
    big[14..16].copy_from_slice(&5000u16.to_be_bytes());
    assert_eq!(exchange(lb.addr, &big), "");
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(150, b'1');
    assert_eq!(exchange(lb.addr, &long), "");
    // Closed before its header was whole.
    drop(TcpStream::connect(lb.addr).unwrap());
    // The slow one is closed by lb, near its timeout.
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = good.join().unwrap();
    assert!(ok > 0);
    assert_eq!(bad, 0, "good clients failed");
    let f = &lb.status()["proxy_headers"]["failures"];
    assert_eq!(f["malformed"], 3, "{f}");
    assert_eq!(f["oversized"], 2, "{f}");
    assert_eq!(f["timeout"], 1, "{f}");
    assert_eq!(f["closed"], 1, "{f}");
    assert_eq!(f["untrusted"], 0, "{f}");
    let metrics = http_get_text(&lb.metrics_addr(), "/metrics");
    for line in [
        "lb_proxy_header_failures_total{reason=\"malformed\"} 3",
        "lb_proxy_header_failures_total{reason=\"oversized\"} 2",
        "lb_proxy_header_failures_total{reason=\"timeout\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    assert!(metrics.contains("lb_proxy_headers_total{version=\"v1\"}"));
    // One log line per reason (at most one a second), never one per connection.
    assert!(lb.log.count("PROXY protocol: a connection") <= 6 * 3);
}

fn http_get_text(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn untrusted_sources_are_refused_or_served_as_direct_clients() {
    let refuse = lb_with(
        "pp-untrusted",
        &["--proxy-protocol", "v1", "--proxy-trusted", "10.0.0.0/8"],
        "2",
    );
    // Even with a well-formed header: 127.0.0.1 may not say who it is.
    assert_eq!(
        exchange(
            refuse.addr,
            &with_get(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n")
        ),
        ""
    );
    assert_eq!(exchange(refuse.addr, GET), "");
    let p = &refuse.status()["proxy_headers"];
    assert_eq!(p["failures"]["untrusted"], 2, "{p}");
    assert_eq!(p["v1"], 0, "{p}");
    let serve = lb_with(
        "pp-serve",
        &[
            "--proxy-protocol",
            "v1",
            "--proxy-trusted",
            "10.0.0.0/8",
            "--proxy-untrusted",
            "serve",
        ],
        "2",
    );
    assert_eq!(exchange(serve.addr, GET), "peer= first=GET / HTTP/1.1\n");
    assert_eq!(serve.status()["proxy_headers"]["untrusted_served"], 1);
}

#[test]
fn a_worker_without_peer_address_gets_conns_without_payload() {
    let lb = lb_with(
        "pp-noflag",
        &["--proxy-protocol", "v1", "--proxy-trusted", "127.0.0.1"],
        "0",
    );
    for _ in 0..4 {
        let body = exchange(
            lb.addr,
            &with_get(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n"),
        );
        assert_eq!(body, "peer= first=GET / HTTP/1.1\n");
    }
}

/// A server on $PORT that reads the PROXY header lb sends (v1 line or v2
/// binary), then the request, and answers with what the header said.
pub(crate) const HEADER_SERVER: &str = r#"
import os, socket, struct, threading, ipaddress
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
def recv_exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b
def serve(c):
    try:
        first = recv_exact(c, 12)
        if first == b"\r\n\r\n\x00\r\nQUIT\n":
            ver, fam, ln = struct.unpack("!BBH", recv_exact(c, 4))
            body = recv_exact(c, ln)
            if fam == 0x00:
                said = "v2 %02x unspec %d" % (ver, ln)
            else:
                if fam == 0x11:
                    src, dst = ipaddress.ip_address(body[0:4]), ipaddress.ip_address(body[4:8])
                    sp, dp = struct.unpack("!HH", body[8:12])
                else:
                    src, dst = ipaddress.ip_address(body[0:16]), ipaddress.ip_address(body[16:32])
                    sp, dp = struct.unpack("!HH", body[32:36])
                said = "v2 %02x %s %s %d %d" % (ver, src, dst, sp, dp)
        else:
            line = first
            while not line.endswith(b"\r\n"):
                line += recv_exact(c, 1)
            said = "v1 " + line[:-2].decode()
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(4096)
            if not d:
                break
            req += d
        body = ("%s | %s\n" % (said, req.split(b"\r\n")[0].decode())).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except EOFError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn proxy_mode_sends_the_worker_a_v1_or_v2_header() {
    let dir = scratch("pp-send");
    let server = dir.join("server.py");
    std::fs::write(&server, HEADER_SERVER).unwrap();
    let server = server.to_str().unwrap();
    // v1, with the address of an incoming header.
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--mode",
            "proxy",
            "--send-proxy",
            "v1",
            "--proxy-protocol",
            "v1",
            "--proxy-trusted",
            "127.0.0.1",
            "--",
            "python3",
            server,
        ],
        &[],
        1,
    );
    let port = lb.addr.port();
    let body = exchange(
        lb.addr,
        &with_get(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 80\r\n"),
    );
    assert_eq!(
        body,
        format!("v1 PROXY TCP4 203.0.113.7 127.0.0.1 4242 {port} | GET / HTTP/1.1\n")
    );
    drop(lb);
    // v2, without an incoming header: the connection's own peer.
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--mode",
            "proxy",
            "--send-proxy",
            "v2",
            "--",
            "python3",
            server,
        ],
        &[],
        1,
    );
    let (body, me) = get_through(lb.addr);
    assert_eq!(
        body,
        format!(
            "v2 21 127.0.0.1 127.0.0.1 {} {} | GET / HTTP/1.1\n",
            me.port(),
            lb.addr.port()
        )
    );
}

#[test]
fn haproxy_accept_proxy_reads_what_lb_sends() {
    if !have("haproxy") {
        eprintln!("haproxy is not installed: skipped (apt-get install haproxy)");
        return;
    }
    // lb (proxy mode, send_proxy v2) → haproxy (accept-proxy, a worker on
    // {port}) → a plain server that answers with the first line it gets.
    let dir = scratch("pp-accept-proxy");
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let served = std::thread::spawn(move || {
        let (mut c, _) = plain.accept().unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let first = String::from_utf8_lossy(&req)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let body = format!("{first}\n");
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let cfg = dir.join("accept.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 64\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 20s\n  timeout server 20s\n\
             frontend f\n  bind \"127.0.0.1:${{PORT}}\" accept-proxy\n  default_backend b\n\
             backend b\n  server s {plain_addr}\n"
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--mode",
            "proxy",
            "--send-proxy",
            "v2",
            "--",
            "haproxy",
            "-db",
            "-f",
            cfg,
        ],
        &[],
        1,
    );
    let (body, _) = get_through(lb.addr);
    // haproxy took the header (or it would have refused the connection),
    // and the server got the request itself first.
    assert_eq!(body, "GET / HTTP/1.1\n");
    served.join().unwrap();
}

#[test]
fn bad_proxy_settings_are_refused_at_start_in_one_line() {
    for (args, says) in [
        (
            vec!["--proxy-protocol", "v2"],
            "set --proxy-trusted to the networks your balancers connect from",
        ),
        (
            vec!["--proxy-protocol", "v2", "--proxy-trusted", "10.0.0.1/8"],
            "write 10.0.0.0/8",
        ),
        (
            vec![
                "--proxy-protocol",
                "v1",
                "--proxy-trusted",
                "127.0.0.1",
                "--mode",
                "shared",
                "--",
                "true",
            ],
            "is mode shared",
        ),
        (
            vec![
                "--proxy-protocol",
                "any",
                "--proxy-trusted",
                "127.0.0.1",
                "--dispatch",
                "kernel",
                "--mode",
                "shared",
                "--",
                "true",
            ],
            "--dispatch master",
        ),
        (vec!["--send-proxy", "v2"], "use mode proxy"),
        (vec!["--proxy-protocol", "v9"], "use off, v1, v2 or any"),
    ] {
        let (status, log) = run_to_exit(&args, &[]);
        assert_eq!(status.code(), Some(2), "{args:?}: {log}");
        let line = log
            .lines()
            .find(|l| l.contains(says))
            .unwrap_or_else(|| panic!("{args:?}: no {says:?} in {log}"));
        assert!(!line.is_empty());
    }
}

/// The header that says the client is 203.0.113.7:4242, and a request
/// after it that asks the server to close once it has answered.
const FROM_203: &[u8] = b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n";
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Every kind of worker behind the real master sees the client the header
/// names: lb's bundled worker, an unmodified Python server and nginx under
/// the shim (their `accept()` and `getpeername()`), and an unmodified Node
/// app (`req.socket.remoteAddress`).
#[test]
fn every_kind_of_worker_sees_the_client_the_header_names() {
    let trust = ["--proxy-protocol", "v1", "--proxy-trusted", "127.0.0.0/8"];
    // The bundled worker.
    let mut args = vec!["--workers", "2"];
    args.extend_from_slice(&trust);
    let lb = Lb::start(&args, &[], 2);
    for _ in 0..4 {
        let body = exchange(lb.addr, &[FROM_203, GET_CLOSE].concat());
        assert!(body.contains("from 203.0.113.7:4242"), "{body}");
    }
    drop(lb);

    // Python's http.server under the shim: it reads the address accept() gave.
    let dir = scratch("pp-every-kind");
    let server = dir.join("server.py");
    std::fs::write(
        &server,
        "import http.server, sys\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       body = ('client %s:%d\\n' % self.client_address[:2]).encode()\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Length', str(len(body)))\n\
         \x20       self.send_header('Connection', 'close')\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(body)\n\
         \x20   def log_message(self, *a):\n\
         \x20       pass\n\
         http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n",
    )
    .unwrap();
    let mut args = vec!["--workers", "2", "--mode", "shim"];
    args.extend_from_slice(&trust);
    args.extend(["--", "python3", server.to_str().unwrap(), "{port}"]);
    let lb = Lb::start(&args, &[], 2);
    for _ in 0..4 {
        let body = exchange(lb.addr, &[FROM_203, GET_CLOSE].concat());
        assert_eq!(body, "client 203.0.113.7:4242\n");
    }
    drop(lb);

    // nginx under the shim: $remote_addr is the header's.
    if have("nginx") {
        let d = dir.to_str().unwrap();
        let conf = write_config(
            &dir,
            "nginx.conf",
            &format!(
                "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
                 error_log stderr;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n\
                 \x20 server {{\n    listen 127.0.0.1:{{port}};\n\
                 \x20   location / {{ return 200 \"$remote_addr:$remote_port\\n\"; }}\n  }}\n}}\n"
            ),
        );
        // ({port} in the file is lb's: nginx reads the file, so lb's own
        // substitution does not reach it; write the port in.)
        let port = free_port();
        let text = std::fs::read_to_string(&conf)
            .unwrap()
            .replace("{port}", &port.to_string());
        std::fs::write(&conf, text).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let sock = dir.join("lb.sock");
        let mut args = vec![
            "--listen",
            &listen,
            "--control",
            sock.to_str().unwrap(),
            "--workers",
            "1",
            "--mode",
            "shim",
        ];
        args.extend_from_slice(&trust);
        args.extend(["--", "nginx", "-p", d, "-e", "stderr", "-c", conf.as_str()]);
        let lb = Lb::start_command(lb_command(&args, &[]), 1);
        for _ in 0..4 {
            let body = exchange(lb.addr, &[FROM_203, GET_CLOSE].concat());
            assert_eq!(body, "203.0.113.7:4242\n");
        }
        drop(lb);
    }

    // An unmodified Node app.
    let app = dir.join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((req, res) => {\n\
         \x20 const s = req.socket;\n\
         \x20 res.setHeader('Connection', 'close');\n\
         \x20 res.end(`client ${s.remoteAddress}:${s.remotePort} ${s.remoteFamily}\\n`);\n\
         }).listen(+process.env.PORT || 8000);\n",
    )
    .unwrap();
    for (node, version) in node_binaries() {
        eprintln!("== Node {version}");
        let mut args = vec!["--workers", "2", "--mode", "node"];
        args.extend_from_slice(&trust);
        args.extend(["--", node.as_str(), app.to_str().unwrap()]);
        let lb = Lb::start(&args, &[], 2);
        for _ in 0..4 {
            let body = exchange(lb.addr, &[FROM_203, GET_CLOSE].concat());
            assert_eq!(body, "client 203.0.113.7:4242 IPv4\n", "Node {version}");
        }
    }
}
