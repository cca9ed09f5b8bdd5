//! `--mode shim`: servers that never heard of lb, made workers by the
//! accept shim (`src/shim/lbshim.c`, `LD_PRELOAD`): Python's http.server,
//! redis-server, nginx, a plain C epoll server (`tests/servers/epoll-server.c`)
//! and the textbook one that trusts `close()` to end its epoll registration
//! (`tests/servers/naive-epoll-server.c`).

use std::time::Duration;

use crate::util::load::{Load, Style, reloads_under_load};
use crate::util::*;

fn shim(workers: usize, policy: &str, command: &[&str]) -> Lb {
    shim_with(&[], workers, policy, command)
}

/// `shim` with more of lb's arguments (`--listen`s, say).
fn shim_with(extra: &[&str], workers: usize, policy: &str, command: &[&str]) -> Lb {
    let n = workers.to_string();
    let mut args = vec![
        "--workers",
        n.as_str(),
        "--mode",
        "shim",
        "--policy",
        policy,
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    Lb::start(&args, &[], workers)
}

/// A fresh path for one of lb's Unix listeners, and its `--listen` value.
fn unix_listener(name: &str) -> (std::path::PathBuf, String) {
    let sock = scratch(name).join("lb.sock");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    (sock, spec)
}

#[test]
fn shim_python_http_server_is_balanced_and_every_close_reported() {
    let server = python_http_server(&scratch("shim-py"));
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    // `python3` here may be pyenv's bash wrapper: the shim stays inert in
    // the wrapper and claims the channel in the real interpreter.
    // Least-connections: the policy for which workers report closes.
    let lb = shim(2, "lc", &server);
    for _ in 0..40 {
        assert_eq!(get(lb.addr, "/index.html"), "hello\n");
    }
    // Every connection's close came back through the shim's close hook.
    let totals = lb.wait_all_closed();
    assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 40, "{totals:?}");
    // (Not an exact split: a close on a handler thread is reported when
    // the next report is due, so least-conn sometimes sees it late.)
    assert!(totals.iter().all(|t| t.0 >= 1), "both served: {totals:?}");
    // getsockname answers with the address the server bound.
    lb.wait_log(
        &format!("Serving HTTP on 127.0.0.1 port {}", lb.addr.port()),
        2,
    );
}

#[test]
fn shim_c_server_round_robin_is_exact_and_survives_kill_9() {
    let server = epoll_server();
    let lb = shim(3, "rr", &[&server, "{port}"]);
    assert_eq!(split(lb.addr, 3, 150), [50, 50, 50]);
    kill_under_load(&lb, 1, 3, "shim");
}

#[test]
fn shim_graceful_stop_lets_a_slow_response_finish() {
    let server = epoll_server();
    let mut lb = shim(2, "rr", &[&server, "{port}"]);
    let body = lb.stop_during("/slow/800");
    assert!(body.starts_with("hello from worker"), "{body}");
    // The shim answered DRAIN with STOP, lb sent SIGTERM; the server
    // finished and exited 0.
    assert_eq!(lb.log.count("exit (exit code 0"), 2);
}

/// The textbook epoll server closes a connection with `close(fd);
/// free(conn)`, trusting close() to end the registration. lb's master may
/// still hold the socket for an instant, so without the shim's
/// `EPOLL_CTL_DEL` before close the server gets events for freed
/// connections: it aborts (its own check) or corrupts its heap.
#[test]
fn shim_textbook_epoll_server_never_sees_a_freed_connection() {
    let server = naive_epoll_server();
    for policy in ["rr", "lc"] {
        let lb = shim(2, policy, &[&server, "{port}"]);
        let tally = Load::start(lb.addr, 50, Style::Close, Some(100_000)).finish();
        eprintln!("naive epoll server, {policy}: {tally:?}");
        assert_eq!(tally.failed, 0, "{policy}: {:?}", tally.first);
        assert_eq!(tally.ok, 100_000);
        let log = lb.log.lines().join("\n");
        assert_eq!(
            lb.log.count(": exit ("),
            0,
            "{policy}: a worker died:\n{log}"
        );
        assert!(!log.contains("freed connection"), "{log}");
        assert!(!log.contains("rescued"), "{log}");
        if policy == "lc" {
            let totals = lb.wait_all_closed();
            let sum: u64 = totals.iter().map(|t| t.0).sum();
            assert_eq!(sum, 100_000, "every close reported: {totals:?}");
        }
    }
}

#[test]
fn shim_least_conn_steers_away_from_long_lived_connections() {
    let server = epoll_server();
    let lb = shim(2, "lc", &[&server, "{port}"]);
    let count = split_after_worker_0_holds_four(lb.addr);
    assert!(
        count[1] >= 36,
        "least-conn should avoid the busy worker: {count:?}"
    );
}

#[test]
fn shim_redis_server_behind_lb() {
    if !installed("redis-server", "the redis shim test") || !installed("redis-benchmark", "it") {
        return;
    }
    let dir = scratch("shim-redis");
    let d = dir.to_str().unwrap();
    let lb = shim(2, "lc", &redis_argv(d));
    let port = lb.addr.port().to_string();
    // A new connection per request (-k 0): 2,000 hand-offs.
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p", &port, "-t", "ping", "-n", "2000", "-c", "10", "-k", "0", "-q",
        ])
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("requests per second"),
        "{text}"
    );
    let totals = lb.wait_all_closed();
    let sum: u64 = totals.iter().map(|t| t.0).sum();
    assert!(
        sum >= 2000,
        "every benchmark connection went through lb: {totals:?}"
    );
    // Least-connections follows how fast each redis frees its connections:
    // on a loaded machine one may take more, but both serve.
    assert!(
        totals.iter().all(|t| t.0 >= sum / 4),
        "both workers served: {totals:?}"
    );
    let ping = std::process::Command::new("redis-cli")
        .args(["-p", &port, "PING"])
        .output()
        .expect("run redis-cli");
    assert_eq!(String::from_utf8_lossy(&ping.stdout).trim(), "PONG");
}

#[test]
fn shim_refuses_a_static_binary_in_one_line() {
    let dir = scratch("shim-static");
    let c = dir.join("s.c");
    std::fs::write(&c, "int main(void){return 0;}\n").unwrap();
    let bin = dir.join("static-server");
    let built = std::process::Command::new("gcc")
        .arg("-static")
        .arg("-o")
        .arg(&bin)
        .arg(&c)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        eprintln!("skipping: no static libc to build a static binary with");
        return;
    }
    let (status, log) = run_to_exit(
        &[
            "--workers",
            "1",
            "--mode",
            "shim",
            "--",
            bin.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("is statically linked"), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");
}

/// lb on a free port with one shim-mode nginx (`master_process on`, two
/// workers that, as root, switch to `nobody`), or `None` without nginx.
fn nginx_behind_shim(name: &str) -> Option<Lb> {
    nginx_behind_shim_also_on(name, None)
}

/// `nginx_behind_shim`, with lb listening on the Unix socket `unix` too.
fn nginx_behind_shim_also_on(name: &str, unix: Option<&str>) -> Option<Lb> {
    if !installed("nginx", "the nginx shim tests") {
        return None;
    }
    // nginx's master listens (the shim claims the channel there); its
    // workers, forked, accept from it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = scratch(name);
    let d = dir.to_str().unwrap();
    let conf = write_config(
        &dir,
        "nginx.conf",
        &format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
             error_log stderr;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n\
             \x20 server {{\n    listen 127.0.0.1:{port} reuseport deferred;\n\
             \x20   location / {{ return 200 \"hello from worker 0 (pid $pid) to $remote_addr\\n\"; }}\n  }}\n}}\n"
        ),
    );
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "policy = \"lc\"\n[[pool]]\nname = \"nginx\"\ncommand = \"nginx\"\n\
             args = [\"-p\", \"{d}\", \"-e\", \"stderr\", \"-c\", \"{conf}\"]\n\
             mode = \"shim\"\nstop_signal = \"SIGQUIT\"\ncount = 1\n"
        ),
    );
    let listen = format!("127.0.0.1:{port}");
    let sock = dir.join("lb.sock");
    let mut args = vec![
        "--listen",
        &listen,
        "--config",
        &config,
        "--control",
        sock.to_str().unwrap(),
    ];
    if let Some(unix) = unix {
        args.extend(["--listen", unix]);
    }
    Some(Lb::start_command(lb_command(&args, &[]), 1))
}

#[test]
fn shim_nginx_prefork_with_unprivileged_workers_stops_gracefully() {
    let Some(mut lb) = nginx_behind_shim("shim-nginx") else {
        return;
    };
    for _ in 0..20 {
        assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
    }
    // DRAIN becomes SIGQUIT, sent by lb: a worker that read DRAIN could not
    // signal its root master itself.
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    lb.wait_log("stopping it with SIGQUIT", 1);
    assert_eq!(lb.log.count("exit (exit code 0"), 1);
}

#[test]
fn shim_nginx_workers_do_not_outlive_a_killed_master() {
    let Some(mut lb) = nginx_behind_shim("shim-nginx-kill") else {
        return;
    };
    assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
    let master = lb.pid_of_slot(0);
    // nginx says READY (listens) before it forks its workers.
    let deadline = std::time::Instant::now() + WAIT;
    let children = loop {
        let children: Vec<u32> =
            std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                .unwrap()
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        if children.len() == 2 {
            break children;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nginx's two workers: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    lb.signal(libc::SIGKILL);
    lb.wait_exit();
    // nginx's master dies with lb (PR_SET_PDEATHSIG); its workers see the
    // channel's EOF and the shim stops them (they cannot signal the master,
    // and must not spin on EOF).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while [master].iter().chain(&children).any(|&p| alive(p)) {
        assert!(std::time::Instant::now() < deadline, "nginx outlived lb");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// lighttpd, its config's port taken over by the shim (the pool's `port`),
/// under keep-alive and `Connection: close` load from 20 clients each, then
/// two reloads under `Connection: close` load with its graceful stop
/// (SIGINT): 0 failed, every close reported.
#[test]
fn shim_lighttpd_under_keep_alive_and_close_load_and_reloads() {
    if !installed("lighttpd", "the lighttpd shim test") {
        return;
    }
    let dir = scratch("shim-lighttpd");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello\n").unwrap();
    // Any port: the shim skips the real bind of this one.
    let conf = write_config(
        &dir,
        "lighttpd.conf",
        &format!(
            "server.document-root = \"{}\"\nserver.bind = \"127.0.0.1\"\nserver.port = 28080\n\
             server.errorlog = \"/dev/stderr\"\nindex-file.names = (\"index.html\")\n",
            www.display()
        ),
    );
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"lighttpd\"\ncommand = \"lighttpd\"\nargs = [\"-D\", \"-f\", \"{conf}\"]\n\
             count = 2\nmode = \"shim\"\nport = 28080\nstop_signal = \"SIGINT\"\n"
        ),
    );
    let lb = Lb::start(&["--policy", "lc", "--config", &config], &[], 2);
    for style in [Style::KeepAlive, Style::Close] {
        let tally = Load::start(lb.addr, 20, style, Some(3000)).finish();
        eprintln!("lighttpd {style:?}: {tally:?}");
        assert_eq!((tally.ok, tally.failed), (3000, 0), "{:?}", tally.first);
    }
    let totals = lb.wait_all_closed();
    assert!(totals.iter().all(|t| t.0 > 0), "both served: {totals:?}");
    let tally = reloads_under_load(&lb, 20, Style::Close, 2, 2..=3);
    eprintln!("lighttpd, 2 reloads: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
}

/// memcached accepts on its main thread and serves and closes each
/// connection on one of 4 worker threads: the shim's close hook runs on
/// threads that did not accept. 4,000 connections from 20 clients, each a
/// set and a get: all answered, every close reported.
#[test]
fn shim_multithreaded_memcached_every_close_reported() {
    if !installed("memcached", "the memcached shim test") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let lb = shim(
        2,
        "lc",
        &[
            "memcached",
            "-p",
            "{port}",
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-t",
            "4",
            "-u",
            "nobody",
        ],
    );
    let addr = lb.addr;
    let clients: Vec<_> = (0..20)
        .map(|c| {
            std::thread::spawn(move || {
                for i in 0..200 {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let key = format!("k{c}-{i}");
                    write!(s, "set {key} 0 0 2\r\nv{}\r\nget {key}\r\n", i % 10).unwrap();
                    let mut r = BufReader::new(s);
                    let mut lines = Vec::new();
                    for _ in 0..4 {
                        let mut line = String::new();
                        r.read_line(&mut line).unwrap();
                        lines.push(line.trim_end().to_string());
                    }
                    let value = format!("v{}", i % 10);
                    let expected = ["STORED", &format!("VALUE {key} 0 2"), &value, "END"];
                    assert_eq!(lines, expected);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("every memcached request answered");
    }
    let totals = lb.wait_all_closed();
    assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 4000, "{totals:?}");
    assert!(totals.iter().all(|t| t.0 > 0), "both served: {totals:?}");
}

/// CPython's subprocess starts children with vfork and sweeps their fds
/// with close_range, in the child, through the shim: the child shares the
/// server's memory and epoll sets, so the shim must leave them alone (it
/// used to take the server's listener for closed: LEAVING, and a
/// replacement, on every request).
#[test]
fn shim_server_that_runs_subprocesses_is_not_disturbed_by_vfork_children() {
    let dir = scratch("shim-vfork");
    let app = dir.join("app.py");
    std::fs::write(
        &app,
        r#"
import http.server, subprocess, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = subprocess.run(["echo", "hello from a child"], capture_output=True).stdout
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#,
    )
    .unwrap();
    let lb = shim(2, "lc", &["python3", app.to_str().unwrap(), "{port}"]);
    for _ in 0..20 {
        assert_eq!(get(lb.addr, "/"), "hello from a child\n");
    }
    let totals = lb.wait_all_closed();
    assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 20, "{totals:?}");
    let log = lb.log.lines().join("\n");
    assert!(!log.contains("leaving"), "{log}");
    assert_eq!(lb.log.count(": spawn"), 2, "no worker was replaced:\n{log}");
}

/// A shim server listens on TCP and gets lb's Unix listener's connections
/// too, whose peer is AF_UNIX: the shim gives it as a client on this host
/// (loopback, port 0), which is what servers expect of a TCP socket. nginx
/// keeps such a connection alive (its TCP_NODELAY, meaningless there,
/// succeeds) and logs 127.0.0.1.
#[test]
fn shim_nginx_serves_lbs_unix_listener_with_keep_alive() {
    if !installed("curl", "the nginx unix-listener test") {
        return;
    }
    let (sock, spec) = unix_listener("shim-nginx-unix-sock");
    let Some(lb) = nginx_behind_shim_also_on("shim-nginx-unix", Some(&spec)) else {
        return;
    };
    let out = std::process::Command::new("curl")
        .args(["-sv", "--max-time", "10", "--unix-socket"])
        .arg(&sock)
        .args(["http://lb/", "http://lb/", "http://lb/"])
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    let trace = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        body.matches("hello from worker 0").count(),
        3,
        "{body}\n{trace}"
    );
    assert_eq!(body.matches("to 127.0.0.1\n").count(), 3, "{body}");
    assert_eq!(
        trace.matches("Re-using existing connection").count(),
        2,
        "{trace}"
    );
    assert!(get(lb.addr, "/").ends_with("to 127.0.0.1\n"));
    assert_eq!(lb.log.count("failed"), 0);
}

/// redis (protected mode on, as by default) lets a client of lb's Unix
/// listener in: it is local, as the shim says.
#[test]
fn shim_redis_serves_lbs_unix_listener_as_a_local_client() {
    if !installed("redis-server", "the redis unix-listener test") || !installed("redis-cli", "it") {
        return;
    }
    let (sock, spec) = unix_listener("shim-redis-unix");
    let dir = sock.parent().unwrap().to_str().unwrap().to_string();
    let lb = shim_with(&["--listen", &spec], 1, "rr", &redis_argv(&dir));
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("timeout")
            .args(["10", "redis-cli", "-s", sock.to_str().unwrap()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mut failed = 0;
    for i in 0..10 {
        failed += usize::from(cli(&["SET", "k", &i.to_string()]) != "OK");
    }
    assert_eq!(failed, 0, "every SET through the socket");
    assert_eq!(cli(&["GET", "k"]), "9");
    let list = cli(&["CLIENT", "LIST"]);
    assert!(
        list.contains("addr=127.0.0.1:0 ") || list.contains("addr=[::1]:0 "),
        "{list}"
    );
    let port = lb.addr.port().to_string();
    let out = std::process::Command::new("timeout")
        .args(["10", "redis-cli", "-p", &port, "GET", "k"])
        .output()
        .expect("run redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "9");
}

/// Python's http.server, on TCP behind lb's TCP and Unix listeners: both
/// served (an AF_UNIX peer made it fail the request).
#[test]
fn shim_python_http_server_serves_lbs_unix_listener() {
    let (sock, spec) = unix_listener("shim-py-unix");
    let server = python_http_server(sock.parent().unwrap());
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let lb = shim_with(&["--listen", &spec], 1, "rr", &server);
    let mut failed = 0;
    for i in 0..20 {
        let got = if i % 2 == 0 {
            try_get_unix(&sock, "/")
        } else {
            try_get(lb.addr, "/")
        };
        failed += usize::from(got.ok().as_deref() != Some("hello\n"));
    }
    assert_eq!(failed, 0);
    assert!(lb.log.count("Traceback") == 0);
    lb.wait_log("127.0.0.1 - - ", 20);
}
