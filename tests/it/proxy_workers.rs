//! The worker side of the PROXY protocol (`docs/protocol.md` §2, "The
//! client's address behind a balancer"): every kind of worker, started by
//! a fake master of this file's own (a real channel, `LB_FD=3` and the rest
//! of §1), is sent a CONN whose payload is a client's address, and must
//! answer with that address: the bundled worker, `examples/hello.c`,
//! `examples/hello.py`, servers under the accept shim (nginx's
//! `$remote_addr`, Python's `http.server` and a `getpeername()` script),
//! and an unmodified Node app (`req.socket.remoteAddress`) under a fake
//! cluster primary. A payload that is no address is served as if there
//! were none, and never ends a worker.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lb::proto::{self, Wait, kind, scm, wire};

use crate::util::*;

/// What no worker may take for an address, each served like no payload.
const NOT_ADDRESSES: [&[u8]; 6] = [
    b"garbage",
    b"203.0.113.7",
    b"203.0.113.7:70000",
    b"2001:db8::7:4242",
    b"\xff\xfe\x00:1",
    &[b'9'; 4000],
];

/// One worker process and the master's end of its channel.
struct FakeMaster {
    chan: OwnedFd,
    child: Child,
    dir: PathBuf,
    /// The master's listener: connections are accepted here and sent.
    front: TcpListener,
    next_id: u64,
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        // Its own process group: nginx and Python's children go with it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FakeMaster {
    /// Starts `argv` as lb would (docs/protocol.md §1), with `env` added;
    /// `{port}` in either becomes the port of `front` (the master's
    /// listener, the port the shim takes over).
    fn start(
        name: &str,
        front: TcpListener,
        argv: &[String],
        env: &[(&str, String)],
    ) -> FakeMaster {
        let dir = scratch(&format!("pw-{name}"));
        let port = front.local_addr().unwrap().port().to_string();
        let (chan, worker) = proto::pair().unwrap();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(argv[1..].iter().map(|a| a.replace("{port}", &port)))
            .current_dir(&dir)
            .env("LB_FD", "3")
            .env("LB_PROTOCOL", "1")
            .env("LB_WORKER_ID", "0")
            .env("LB_GENERATION", "1")
            .env("LB_REPORT_CLOSED", "0")
            .env("LB_OWN_LISTENER", "0")
            .env("LB_DRAIN_TIMEOUT_MS", "5000")
            .envs(env.iter().map(|(k, v)| (k, v.replace("{port}", &port))))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .process_group(0);
        lb::sys::prepare_child(&mut cmd, Some(worker.as_raw_fd()), proto::WORKER_FD);
        let child = cmd.spawn().unwrap();
        drop(worker);
        FakeMaster {
            chan,
            child,
            dir,
            front,
            next_id: 1,
        }
    }

    /// What the worker wrote to stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The flags of the worker's READY (other messages are skipped).
    fn ready(&self) -> u64 {
        let until = Instant::now() + WAIT;
        let mut buf = [0u8; wire::MAX_MESSAGE];
        loop {
            match scm::recv(self.chan.as_fd(), &mut buf, Wait::DontWait) {
                Ok(got) if got.len == 0 => panic!("the worker exited: {}", self.stderr()),
                Ok(got) => {
                    if let Ok(proto::Message::Ready { flags }) =
                        wire::parse(&buf[..got.len], got.truncated)
                    {
                        return flags;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < until, "no READY: {}", self.stderr());
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("channel: {e}"),
            }
        }
    }

    /// A client's connection, sent as a CONN with `payload`; the client's end.
    fn connect(&mut self, payload: &[u8]) -> TcpStream {
        let client = TcpStream::connect(self.front.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let (conn, _) = self.front.accept().unwrap();
        // As the master accepts: non-blocking.
        conn.set_nonblocking(true).unwrap();
        let header = wire::header(kind::CONN, self.next_id);
        self.next_id += 1;
        scm::send(
            self.chan.as_fd(),
            &header,
            payload,
            Some(conn.as_fd()),
            Wait::Block,
        )
        .unwrap();
        client
    }

    /// One CONN carrying a connection per line of `lines` (a batching
    /// worker's: the count in the header, the lines its payload); one
    /// `GET /` on each, in turn: the bodies, in the same order.
    fn batch_bodies(&mut self, lines: &[&[u8]]) -> Vec<String> {
        let clients: Vec<TcpStream> = lines
            .iter()
            .map(|_| {
                let c = TcpStream::connect(self.front.local_addr().unwrap()).unwrap();
                c.set_read_timeout(Some(WAIT)).unwrap();
                c
            })
            .collect();
        let conns: Vec<TcpStream> = lines
            .iter()
            .map(|_| {
                let (conn, _) = self.front.accept().unwrap();
                conn.set_nonblocking(true).unwrap();
                conn
            })
            .collect();
        let payload = lines.join(&b'\n');
        let sent = proto::send_conns(
            self.chan.as_fd(),
            &conns,
            &[&payload],
            self.next_id,
            lines.len(),
        )
        .unwrap();
        assert_eq!(sent, lines.len());
        self.next_id += lines.len() as u64;
        drop(conns);
        clients
            .into_iter()
            .map(|mut client| {
                client
                    .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                    .unwrap();
                read_body(client).unwrap_or_else(|e| panic!("{e}: {}", self.stderr()))
            })
            .collect()
    }

    /// One `GET /` on a connection sent with `payload`: the whole response.
    fn get(&mut self, payload: &[u8]) -> String {
        let mut client = self.connect(payload);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        if let Err(e) = client.read_to_string(&mut out) {
            panic!(
                "no answer ({e}) with {:?}: {}",
                show(payload),
                self.stderr()
            );
        }
        out
    }

    /// The body of `get`, which must be a 200.
    fn body(&mut self, payload: &[u8]) -> String {
        let resp = self.get(payload);
        match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.contains(" 200 ") => body.to_string(),
            _ => panic!(
                "not a 200 with {:?}: {resp:?} {}",
                show(payload),
                self.stderr()
            ),
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

fn show(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    text.chars().take(40).collect()
}

/// A native worker (lb's protocol): READY says PEER_ADDRESS (and `flags`
/// besides), the body names the client the CONN carried, in both families,
/// keeping the slot and pid where the tests read them; with no payload (or
/// one that is no address) the body is what it always was.
fn native_worker_names_its_client(name: &str, argv: &[String], flags: u64) {
    let mut m = FakeMaster::start(name, front(), argv, &[]);
    assert_eq!(
        m.ready(),
        wire::ready::PEER_ADDRESS | flags,
        "{name}'s READY"
    );
    let body = m.body(b"203.0.113.7:4242");
    assert!(body.contains(" from 203.0.113.7:4242 "), "{name}: {body:?}");
    assert_eq!(
        (slot_of(&body), pid_of(&body)),
        (0, m.child.id()),
        "{body:?}"
    );
    let body = m.body(b"[2001:db8::7]:4242");
    assert!(
        body.contains(" from [2001:db8::7]:4242 "),
        "{name}: {body:?}"
    );
    let plain = format!("hello from worker 0 (pid {})\n", m.child.id());
    assert_eq!(m.body(b""), plain, "{name} without an address");
    for bad in NOT_ADDRESSES {
        assert_eq!(m.body(bad), plain, "{name} with {:?}", show(bad));
    }
    // Several connections to a CONN (BATCH; one that did not say it takes
    // them all the same): each is served, with its own line's address (an
    // empty or bad one: none).
    let bodies = m.batch_bodies(&[b"203.0.113.1:1", b"", b"[2001:db8::3]:3", b"garbage"]);
    assert!(
        bodies[0].contains(" from 203.0.113.1:1 "),
        "{name}: {bodies:?}"
    );
    assert_eq!(bodies[1], plain, "{name}: {bodies:?}");
    assert!(
        bodies[2].contains(" from [2001:db8::3]:3 "),
        "{name}: {bodies:?}"
    );
    assert_eq!(bodies[3], plain, "{name}: {bodies:?}");
    let bodies = m.batch_bodies(&[&b""[..]; 8]);
    assert!(bodies.iter().all(|b| *b == plain), "{name}: {bodies:?}");
    assert!(m.alive(), "{name} died: {}", m.stderr());
}

#[test]
fn proxy_workers_the_bundled_worker_names_its_client() {
    native_worker_names_its_client(
        "bundled",
        &[lb_bin().into(), "hello-worker".into()],
        wire::ready::BATCH,
    );
}

#[test]
fn proxy_workers_hello_c_names_its_client() {
    native_worker_names_its_client("hello-c", &[c_worker()], wire::ready::BATCH);
}

#[test]
fn proxy_workers_hello_py_names_its_client() {
    let script = repo().join("examples/hello.py");
    native_worker_names_its_client(
        "hello-py",
        &["python3".into(), script.to_str().unwrap().into()],
        // It serves one connection at a time: no BATCH.
        0,
    );
}

/// A listener for the fake master to accept its clients from.
fn front() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// `argv` under the accept shim, on the port of `front`.
fn shimmed(name: &str, front: TcpListener, argv: &[String]) -> FakeMaster {
    let dir = scratch(&format!("pw-{name}-so"));
    let so = dir.join("liblbshim.so");
    std::fs::write(&so, lb::shim::LIBRARY).unwrap();
    let env = [
        ("LB_SHIM_PORT", "{port}".to_string()),
        ("LD_PRELOAD", so.to_str().unwrap().to_string()),
    ];
    let m = FakeMaster::start(name, front, argv, &env);
    assert_eq!(m.ready(), wire::ready::PEER_ADDRESS, "{name}'s READY");
    m
}

/// nginx's `$remote_addr` and `$remote_port` are the client's, on an IPv4
/// and an IPv6 listener, as the kernel would give them (an IPv4 client of
/// an IPv6 socket v4-mapped; an IPv6 client of an IPv4 one has no such
/// form: the real peer); a connection without an address that gets the
/// same fd number after one shows the real peer (the address was forgotten
/// at close); nothing that is no address confuses it.
#[test]
fn proxy_workers_nginx_under_the_shim_sees_the_client() {
    if !installed("nginx", "the nginx PROXY-worker test") {
        return;
    }
    for (family, host) in [("4", "127.0.0.1"), ("6", "[::1]")] {
        let front = front();
        let port = front.local_addr().unwrap().port();
        let dir = scratch(&format!("pw-nginx{family}-conf"));
        let d = dir.to_str().unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr;\n\
                 events {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n\
                 \x20 server {{\n    listen {host}:{port};\n\
                 \x20   location / {{ return 200 \"$remote_addr $remote_port\\n\"; }}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let argv: Vec<String> = [
            "nginx",
            "-p",
            d,
            "-e",
            "stderr",
            "-c",
            conf.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut m = shimmed(&format!("nginx{family}"), front, &argv);
        let (v4, v6) = if family == "6" {
            ("::ffff:203.0.113.7 4242\n", Some("2001:db8::7 4242\n"))
        } else {
            ("203.0.113.7 4242\n", None)
        };
        assert_eq!(m.body(b"203.0.113.7:4242"), v4);
        let body = m.body(b"[2001:db8::7]:4242");
        match v6 {
            Some(v6) => assert_eq!(body, v6),
            None => assert!(body.starts_with("127.0.0.1 "), "{body:?}"),
        }
        for payload in [&b""[..]].into_iter().chain(NOT_ADDRESSES) {
            let body = m.body(payload);
            assert!(
                body.starts_with("127.0.0.1 "),
                "IPv{family}, {:?}: {body:?}",
                show(payload)
            );
        }
        assert!(m.body(b"198.51.100.1:1").ends_with("198.51.100.1 1\n"));
        assert!(m.alive(), "nginx died: {}", m.stderr());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Python's `http.server` logs the client's address it got from accept().
#[test]
fn proxy_workers_python_http_server_under_the_shim_logs_the_client() {
    let argv = python_http_server(&scratch("pw-http-root"));
    let mut m = shimmed("http-server", front(), &argv);
    for _ in 0..3 {
        assert_eq!(m.body(b"203.0.113.7:4242"), "hello\n");
    }
    assert_eq!(m.body(b"garbage"), "hello\n");
    let until = Instant::now() + WAIT;
    while m.stderr().matches("\"GET / HTTP/1.1\" 200").count() < 4 {
        assert!(Instant::now() < until, "{}", m.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = m.stderr();
    assert_eq!(log.matches("203.0.113.7 - - [").count(), 3, "{log}");
    assert_eq!(log.matches("127.0.0.1 - - [").count(), 1, "{log}");
}

/// A server that reads both accept()'s address and getpeername(), on an
/// IPv4 or an IPv6 socket, given as the kernel would: an IPv4 client of an
/// IPv6 socket v4-mapped, a v4-mapped one of an IPv4 socket unmapped, an
/// IPv6 one of an IPv4 socket (which has no room for it) the real peer.
const PEERS: &str = r#"
import socket, sys
v6 = sys.argv[2] == "6"
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
s.bind(("::1" if v6 else "127.0.0.1", int(sys.argv[1])))
s.listen()
while True:
    c, a = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\r\n\r\n%s %s\n" % (repr(a[:2]).encode(), repr(c.getpeername()[:2]).encode()))
    c.close()
"#;

#[test]
fn proxy_workers_accept_and_getpeername_under_the_shim_answer_the_client() {
    for family in ["4", "6"] {
        let argv: Vec<String> = ["python3", "-c", PEERS, "{port}", family]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut m = shimmed(&format!("peers{family}"), front(), &argv);
        let v4 = if family == "6" {
            "('::ffff:203.0.113.7', 4242)"
        } else {
            "('203.0.113.7', 4242)"
        };
        assert_eq!(m.body(b"203.0.113.7:4242"), format!("{v4} {v4}\n"));
        let mapped = m.body(b"[::ffff:203.0.113.9]:1");
        let v6 = m.body(b"[2001:db8::7]:4242");
        if family == "6" {
            let v6_text = "('2001:db8::7', 4242)";
            assert_eq!(v6, format!("{v6_text} {v6_text}\n"));
            let text = "('::ffff:203.0.113.9', 1)";
            assert_eq!(mapped, format!("{text} {text}\n"));
        } else {
            assert_eq!(v6.matches("('127.0.0.1', ").count(), 2, "{v6:?}");
            let text = "('203.0.113.9', 1)";
            assert_eq!(mapped, format!("{text} {text}\n"));
        }
        for payload in [&b""[..]].into_iter().chain(NOT_ADDRESSES) {
            let body = m.body(payload);
            assert_eq!(
                body.matches("('127.0.0.1', ").count(),
                2,
                "IPv{family}, {:?}: {body:?}",
                show(payload)
            );
        }
        assert!(m.alive(), "{}", m.stderr());
    }
}

/// An unmodified Node app (`http.createServer`, reading the socket's
/// remote address both in `'connection'` and in the request) under a fake
/// cluster primary: lb's `newconn` line with the client's address, and
/// lb's preload told `addresses`.
const NODE_APP: &str = r#"
const http = require('http');
const server = http.createServer((req, res) => {
  const s = req.socket;
  res.end(`${s.remoteAddress} ${s.remotePort} ${s.remoteFamily} ${s.lbSeen}\n`);
});
server.on('connection', (s) => { s.lbSeen = s.remoteAddress; });
server.listen(Number(process.argv[2]));
"#;

/// The fake primary's end of a Node worker's channel.
struct Primary {
    chan: BufReader<UnixStream>,
    child: Child,
    dir: PathBuf,
}

impl Drop for Primary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Primary {
    /// The next line the worker sent, as JSON.
    fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        match self.chan.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).unwrap(),
            other => panic!(
                "the Node worker said nothing more ({other:?}): {}",
                std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
            ),
        }
    }

    /// Lines until the cluster message `act`.
    fn until(&mut self, act: &str) -> serde_json::Value {
        loop {
            let v = self.line();
            if v["act"] == act {
                return v;
            }
        }
    }
}

#[test]
fn proxy_workers_a_node_app_sees_the_client() {
    for (node, version) in node_binaries() {
        // Closes are reported only when lb asks for them too.
        for wants in ["addresses", "addresses,closes"] {
            node_app_sees_the_client(&node, &version, wants);
        }
    }
}

fn node_app_sees_the_client(node: &str, version: &str, wants: &str) {
    let dir = scratch(&format!("pw-node-{version}-{wants}"));
    std::fs::write(dir.join("app.js"), NODE_APP).unwrap();
    let preload = dir.join("preload.js");
    std::fs::write(&preload, proto::node::PRELOAD).unwrap();
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = front.local_addr().unwrap().port();
    let (primary, worker) = proto::stream_pair().unwrap();
    let mut cmd = Command::new(node);
    cmd.arg(dir.join("app.js"))
        .arg(port.to_string())
        .env("NODE_UNIQUE_ID", "1")
        .env("NODE_CHANNEL_FD", "3")
        .env("NODE_CHANNEL_SERIALIZATION_MODE", "json")
        .env(
            "NODE_OPTIONS",
            format!("--require \"{}\"", preload.display()),
        )
        .env("LB_NODE_PRELOAD", wants)
        .env("LB_WORKER_ID", "0")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    lb::sys::prepare_child(&mut cmd, Some(worker.as_raw_fd()), proto::WORKER_FD);
    let child = cmd.spawn().unwrap();
    drop(worker);
    let chan = UnixStream::from(primary);
    chan.set_read_timeout(Some(WAIT)).unwrap();
    let mut p = Primary {
        chan: BufReader::new(chan),
        child,
        dir,
    };
    let query = p.until("queryServer");
    let key = format!("lb:{port}");
    let answer = proto::node::answer(
        query["seq"].as_u64().unwrap(),
        1,
        &proto::node::Answer::Serve {
            key: &key,
            data: "null",
            address: "127.0.0.1",
            ipv6: false,
            port,
        },
    );
    p.chan.get_mut().write_all(&answer).unwrap();
    p.until("listening");

    let mut newconn = proto::node::NewConn::new(&key);
    let mut seq = 1;
    let ask = |line: &[u8], what: &str| -> String {
        let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let (conn, _) = front.accept().unwrap();
        let chan = p.chan.get_ref().as_fd();
        let sent = scm::send(chan, line, &[], Some(conn.as_fd()), Wait::Block).unwrap();
        assert_eq!(sent, line.len());
        drop(conn);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        client
            .read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("{version}, {what}: {e}"));
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(out)
    };
    for (peer, want) in [
        ("203.0.113.7:4242", "203.0.113.7 4242 IPv4 203.0.113.7\n"),
        ("[2001:db8::7]:4242", "2001:db8::7 4242 IPv6 2001:db8::7\n"),
    ] {
        seq += 1;
        let line = newconn
            .line_with_peer(seq, Some(peer.parse().unwrap()))
            .to_vec();
        assert_eq!(ask(&line, peer), want, "{version}");
    }
    // No address, or one that is no address: the socket's own peer.
    seq += 1;
    let plain = newconn.line(seq).to_vec();
    let body = ask(&plain, "no address");
    assert!(body.starts_with("127.0.0.1 "), "{version}: {body:?}");
    for bad in [
        r#"{"address":5,"port":4242,"family":"IPv4"}"#,
        r#"{"address":"203.0.113.7","port":"x","family":"IPv4"}"#,
        r#"{"address":"203.0.113.7","port":4242,"family":"unix"}"#,
        r#"null"#,
        r#""203.0.113.7:4242""#,
    ] {
        seq += 1;
        let line = format!(
            "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_CLUSTER\",\
             \"act\":\"newconn\",\"key\":\"{key}\",\"seq\":{seq},\"lb_peer\":{bad}}}}}\n"
        );
        let body = ask(line.as_bytes(), bad);
        assert!(body.starts_with("127.0.0.1 "), "{version}, {bad}: {body:?}");
    }
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "{version}: the app died"
    );
    // What the worker said meanwhile: close reports only if asked for.
    let served = seq - 1;
    let mut closed = 0;
    let until = Instant::now() + WAIT;
    p.chan
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    loop {
        let mut line = String::new();
        match p.chan.read_line(&mut line) {
            Ok(n) if n > 0 => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                closed += v["lb_closed"].as_u64().unwrap_or(0);
            }
            _ if wants.contains("closes") && closed < served && Instant::now() < until => {}
            _ => break,
        }
    }
    let want = if wants.contains("closes") { served } else { 0 };
    assert_eq!(closed, want, "{version}, {wants}: closes reported");
}
