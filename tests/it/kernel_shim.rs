//! `--mode shim --dispatch kernel`: unmodified servers (nginx with several
//! worker processes, redis-server, memcached with threads) accept from a
//! listener of their own, which the shim's `listen()` puts in place of
//! their socket; a BPF program picks the worker per connection. Needs root
//! (or CAP_BPF and CAP_NET_ADMIN) and the servers: elsewhere the tests say
//! so and skip.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::load::{Load, Style, reloads_under_load};
use crate::util::*;

fn kernel_available() -> bool {
    match lb::dispatch::kernel::Steering::new(lb::policy::PolicyKind::RoundRobin) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: BPF programs cannot be loaded here ({e})");
            false
        }
    }
}

/// The parent of `pid` (an nginx worker's is its master: the lb worker).
fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Which lb slot's process is `pid` (or its parent), among `slots`.
fn slot_of_pid(lb: &Lb, slots: usize, pid: u32) -> usize {
    (0..slots)
        .find(|&s| lb.pid_of_slot(s) == pid)
        .unwrap_or_else(|| panic!("pid {pid} is no slot's worker"))
}

/// The nginx worker that answered a `Connection: close` request.
fn nginx_pid(addr: SocketAddr) -> u32 {
    let body = get(addr, "/");
    body.trim()
        .strip_prefix("nginx pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not nginx's body: {body:?}"))
}

/// lb with `workers` shim-mode nginx masters (2 worker processes each,
/// `listen … reuseport deferred`, switched to `nobody`) under kernel
/// dispatch, or `None` (the test skips).
fn nginx_lb(name: &str, workers: usize, policy: &str) -> Option<Lb> {
    if !installed("nginx", "the nginx kernel-shim tests") || !kernel_available() {
        return None;
    }
    let dir = scratch(name);
    let d = dir.to_str().unwrap();
    // Any port: the shim skips the real bind of this one (the pool's
    // `port`) and puts the worker's own listener on lb's port in its place.
    let conf = write_config(
        &dir,
        "nginx.conf",
        "daemon off;\nmaster_process on;\nworker_processes 2;\nerror_log stderr;\n\
         events { worker_connections 512; }\nhttp {\n  access_log off;\n  server {\n\
         \x20   listen 127.0.0.1:28081 reuseport deferred;\n\
         \x20   location / { return 200 \"nginx pid $pid\\n\"; }\n  }\n}\n",
    );
    // A pid file per process: slots and their successors run side by side.
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"nginx\"\ncommand = \"sh\"\nargs = [\"-c\", \"exec nginx -p {d} \
             -e stderr -c {conf} -g 'pid {d}/nginx.$$.pid;'\"]\nmode = \"shim\"\nport = 28081\n\
             stop_signal = \"SIGQUIT\"\ncount = {workers}\n"
        ),
    );
    Some(Lb::start(
        &[
            "--policy",
            policy,
            "--dispatch",
            "kernel",
            "--config",
            &config,
        ],
        &[],
        workers,
    ))
}

#[test]
fn kernel_shim_nginx_prefork_splits_round_robin_and_serves_keep_alive_and_close() {
    let Some(lb) = nginx_lb("kshim-nginx", 2, "rr") else {
        return;
    };
    lb.wait_log("dispatch kernel:", 1);
    // Which lb worker answered: the parent of the nginx worker that did.
    // The kernel's program hands new connections out in turn.
    let mut split = [0; 2];
    let mut nginx_workers = std::collections::HashSet::new();
    for _ in 0..200 {
        let pid = nginx_pid(lb.addr);
        nginx_workers.insert(pid);
        split[slot_of_pid(&lb, 2, ppid(pid))] += 1;
    }
    assert_eq!(split, [100, 100]);
    eprintln!("nginx worker processes that answered: {nginx_workers:?}");
    for style in [Style::KeepAlive, Style::Close] {
        let tally = Load::start(lb.addr, 20, style, Some(4000)).finish();
        eprintln!("nginx {style:?}: {tally:?}");
        assert_eq!((tally.ok, tally.failed), (4000, 0), "{:?}", tally.first);
    }
    // lb accepted nothing: the servers did, each from its own listener.
    let status = lb.ctl(&["status"]);
    assert!(status.contains("(kernel dispatch)"), "{status}");
    assert!(status.contains("ready: 2 of 2 workers"), "{status}");
    let json = lb.status();
    assert_eq!(json["dispatch"], "kernel", "{json}");
    let log = lb.log.lines().join("\n");
    assert!(!log.contains("without taking its own listener"), "{log}");
}

/// Two rolling reloads under `Connection: close` load from 20 clients:
/// each new nginx takes its own listener, each old one stops on SIGQUIT
/// and what was queued in its listener moves to the others. Nothing fails.
#[test]
fn kernel_shim_nginx_rolling_reloads_under_load_lose_nothing() {
    let Some(lb) = nginx_lb("kshim-nginx-reload", 2, "rr") else {
        return;
    };
    let tally = reloads_under_load(&lb, 20, Style::Close, 2, 2..=3);
    eprintln!("nginx, 2 reloads under Connection: close: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
    // Each old nginx stopped cleanly (the last may still be on its way).
    lb.wait_log("exit (exit code 0", 4);
    // The new generation serves.
    let now = [lb.pid_of_slot(0), lb.pid_of_slot(1)];
    for _ in 0..10 {
        let parent = ppid(nginx_pid(lb.addr));
        assert!(
            now.contains(&parent),
            "an old nginx answered (master {parent})"
        );
    }
}

/// The same under keep-alive load: nginx's graceful stop closes idle
/// keep-alive connections at once (as on its own reload), so a request
/// that crosses that close fails; measured, not a promise lb can make.
#[test]
fn kernel_shim_nginx_rolling_reload_under_keep_alive_load() {
    let Some(lb) = nginx_lb("kshim-nginx-reload-ka", 2, "rr") else {
        return;
    };
    let tally = reloads_under_load(&lb, 20, Style::KeepAlive, 2, 2..=3);
    eprintln!("nginx, 2 reloads under keep-alive: {tally:?}");
    assert!(tally.ok > 0);
    // No new connection failed: each listener hand-over lost nothing.
    assert_eq!(tally.refused, 0, "{tally:?}");
    assert!(
        tally
            .first
            .iter()
            .all(|f| f.contains("reused connection: true")),
        "{tally:?}"
    );
}

/// lb killed outright: nginx's master dies with it (PR_SET_PDEATHSIG) and
/// its workers, which accept from their inherited listener and never read
/// lb's channel, are killed with its process group.
#[test]
fn kernel_shim_nginx_workers_do_not_outlive_a_killed_lb() {
    let Some(mut lb) = nginx_lb("kshim-nginx-lb-killed", 1, "rr") else {
        return;
    };
    let master = lb.pid_of_slot(0);
    let deadline = Instant::now() + WAIT;
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
            Instant::now() < deadline,
            "nginx's two workers: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ppid(nginx_pid(lb.addr)), master);
    lb.signal(libc::SIGKILL);
    lb.wait_exit();
    let deadline = Instant::now() + Duration::from_secs(5);
    while [master].iter().chain(&children).any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "nginx outlived lb");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kill -9 of one nginx master under load: lb kills its group, and only
/// the requests its workers held fail; the other slot serves on, the slot
/// restarts and serves again.
#[test]
fn kernel_shim_nginx_kill_9_under_load_fails_only_what_it_held() {
    let Some(lb) = nginx_lb("kshim-nginx-kill", 2, "rr") else {
        return;
    };
    let clients = 4;
    let load = Load::start(lb.addr, clients, Style::Close, None);
    load.wait_more(200);
    let victim = lb.pid_of_slot(0);
    send_signal(victim, libc::SIGKILL);
    lb.wait_log("worker 0 gen 1: spawn", 2);
    // Slot 1 served meanwhile and after.
    load.wait_more(200);
    lb.wait_ready(3);
    let replacement = lb.pid_of_slot(0);
    assert_ne!(replacement, victim);
    let deadline = Instant::now() + WAIT;
    while ppid(nginx_pid(lb.addr)) != replacement {
        assert!(Instant::now() < deadline, "the restarted nginx got nothing");
    }
    load.wait_more(200);
    let tally = load.stop();
    eprintln!("nginx kill -9 under load: {tally:?}");
    // One request in flight per client: at most those the dead nginx's
    // workers had accepted fail; what waited in its queue moved.
    assert!(tally.failed <= clients as u64, "{tally:?}");
}

/// One RESP exchange on a new connection: `command`, then QUIT; all the
/// server wrote.
fn resp(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{command}\r\nQUIT\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn redis_pid(addr: SocketAddr) -> u32 {
    let info = resp(addr, "INFO server").unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id in {info:?}"))
}

/// `clients` clients sending `per_client` PINGs each, on one connection
/// each (`keep_alive`) or a new one per PING; (answered, failed).
fn ping_load(addr: SocketAddr, clients: usize, per_client: usize, keep_alive: bool) -> (u64, u64) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut conn: Option<TcpStream> = None;
                for _ in 0..per_client {
                    let attempt = (|| -> std::io::Result<TcpStream> {
                        let mut s = match conn.take() {
                            Some(s) => s,
                            None => {
                                let s = TcpStream::connect(addr)?;
                                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                                s
                            }
                        };
                        s.write_all(b"PING\r\n")?;
                        let mut reply = [0u8; 7];
                        s.read_exact(&mut reply)?;
                        if &reply != b"+PONG\r\n" {
                            return Err(std::io::Error::other(format!("reply {reply:?}")));
                        }
                        Ok(s)
                    })();
                    match attempt {
                        Ok(s) => {
                            ok += 1;
                            if keep_alive {
                                conn = Some(s);
                            }
                        }
                        Err(e) => {
                            eprintln!("PING failed: {e}");
                            failed += 1;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn redis_lb(name: &str, policy: &str) -> Option<Lb> {
    if !installed("redis-server", "the redis kernel-shim test") || !kernel_available() {
        return None;
    }
    let dir = scratch(name);
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "--workers",
        "2",
        "--mode",
        "shim",
        "--dispatch",
        "kernel",
        "--policy",
        policy,
        "--",
    ];
    args.extend(redis_argv(d));
    Some(Lb::start(&args, &[], 2))
}

#[test]
fn kernel_shim_redis_splits_round_robin_and_serves_keep_alive_and_close() {
    let Some(lb) = redis_lb("kshim-redis", "rr") else {
        return;
    };
    let mut split = [0; 2];
    for _ in 0..100 {
        split[slot_of_pid(&lb, 2, redis_pid(lb.addr))] += 1;
    }
    assert_eq!(split, [50, 50]);
    assert_eq!(ping_load(lb.addr, 10, 500, true), (5000, 0), "keep-alive");
    assert_eq!(
        ping_load(lb.addr, 10, 200, false),
        (2000, 0),
        "a connection per PING"
    );
    // redis's own client, with its own error accounting.
    if installed("redis-benchmark", "its part of the redis test") {
        let port = lb.addr.port().to_string();
        for keep_alive in ["1", "0"] {
            let out = std::process::Command::new("timeout")
                .args([
                    "60",
                    "redis-benchmark",
                    "-p",
                    &port,
                    "-t",
                    "ping",
                    "-n",
                    "4000",
                ])
                .args(["-c", "10", "-k", keep_alive, "-q"])
                .output()
                .expect("run redis-benchmark");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && text.contains("requests per second"),
                "-k {keep_alive}: {text}"
            );
            assert!(
                !text.to_lowercase().contains("error"),
                "-k {keep_alive}: {text}"
            );
        }
    }
    let status = lb.ctl(&["status"]);
    assert!(
        status.contains("(kernel dispatch)") && status.contains("ready: 2 of 2"),
        "{status}"
    );
}

/// Least-connections under kernel dispatch reads the shim's ACCEPTED and
/// CLOSED: every connection redis accepted by itself is counted, every
/// close reported, and both workers serve.
#[test]
fn kernel_shim_redis_least_conn_counts_every_accept_and_close() {
    let Some(lb) = redis_lb("kshim-redis-lc", "lc") else {
        return;
    };
    assert_eq!(ping_load(lb.addr, 10, 200, false), (2000, 0));
    let totals = lb.wait_all_closed();
    let sum: u64 = totals.iter().map(|t| t.0).sum();
    assert_eq!(sum, 2000, "{totals:?}");
    assert!(totals.iter().all(|t| t.0 >= 200), "both served: {totals:?}");
}

/// memcached accepts on its main thread and closes on 4 worker threads:
/// ACCEPTED and CLOSED come from different threads, and every one of
/// 4,000 connections is counted both ways.
#[test]
fn kernel_shim_multithreaded_memcached_every_accept_and_close_reported() {
    if !installed("memcached", "the memcached kernel-shim test") || !kernel_available() {
        return;
    }
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--mode",
            "shim",
            "--dispatch",
            "kernel",
            "--policy",
            "lc",
            "--",
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
        &[],
        2,
    );
    let addr = lb.addr;
    let clients: Vec<_> = (0..20)
        .map(|c| {
            std::thread::spawn(move || {
                let mut failed = 0;
                for i in 0..200 {
                    let key = format!("k{c}-{i}");
                    let reply = (|| -> std::io::Result<String> {
                        let mut s = TcpStream::connect(addr)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        write!(s, "set {key} 0 0 2\r\nv{}\r\nget {key}\r\nquit\r\n", i % 10)?;
                        let mut out = String::new();
                        s.read_to_string(&mut out)?;
                        Ok(out)
                    })();
                    let want = format!("STORED\r\nVALUE {key} 0 2\r\nv{}\r\nEND\r\n", i % 10);
                    if reply.as_ref().ok() != Some(&want) {
                        eprintln!("memcached: {reply:?}");
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let failed: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(failed, 0);
    let totals = lb.wait_all_closed();
    assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 4000, "{totals:?}");
    assert!(totals.iter().all(|t| t.0 > 0), "both served: {totals:?}");
}

/// The bundled C epoll server (plain accept loop, epoll registered after
/// listen): `kill -9` under load with lb's own scenario, whose bodies name
/// the lb worker's pid.
#[test]
fn kernel_shim_c_server_round_robin_is_exact_and_survives_kill_9() {
    if !kernel_available() {
        return;
    }
    let server = epoll_server();
    let lb = Lb::start(
        &[
            "--workers",
            "3",
            "--mode",
            "shim",
            "--dispatch",
            "kernel",
            "--policy",
            "rr",
            "--",
            &server,
            "{port}",
        ],
        &[],
        3,
    );
    assert_eq!(split(lb.addr, 3, 150), [50, 50, 50]);
    kill_under_load(&lb, 1, 3, "kernel shim");
}
