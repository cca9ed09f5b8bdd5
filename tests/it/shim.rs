//! `--mode shim`: servers that never heard of lb, made workers by the
//! accept shim (`src/shim/lbshim.c`, `LD_PRELOAD`): Python's http.server,
//! redis-server, nginx, a plain C epoll server (`tests/servers/epoll-server.c`)
//! and the textbook one that trusts `close()` to end its epoll registration
//! (`tests/servers/naive-epoll-server.c`).

use std::time::Duration;

use crate::util::load::{Load, Style};
use crate::util::*;

fn shim(workers: usize, policy: &str, command: &[&str]) -> Lb {
    let n = workers.to_string();
    let mut args = vec![
        "--workers",
        n.as_str(),
        "--mode",
        "shim",
        "--policy",
        policy,
        "--",
    ];
    args.extend_from_slice(command);
    Lb::start(&args, &[], workers)
}

#[test]
fn shim_python_http_server_is_balanced_and_every_close_reported() {
    let dir = scratch("shim-py");
    std::fs::write(dir.join("index.html"), "hello\n").unwrap();
    let d = dir.to_str().unwrap();
    // `python3` here may be pyenv's bash wrapper: the shim stays inert in
    // the wrapper and claims the channel in the real interpreter.
    // Least-connections: the policy for which workers report closes.
    let lb = shim(
        2,
        "lc",
        &[
            "python3",
            "-m",
            "http.server",
            "{port}",
            "--bind",
            "127.0.0.1",
            "--directory",
            d,
        ],
    );
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
    let lb = shim(
        2,
        "lc",
        &[
            "redis-server",
            "--port",
            "{port}",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            d,
        ],
    );
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
    let (a, b) = (totals[0].0 as i64, totals[1].0 as i64);
    assert!(
        (a - b).abs() <= sum as i64 / 5,
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
             \x20   location / {{ return 200 \"hello from worker 0 (pid $pid)\\n\"; }}\n  }}\n}}\n"
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
    Some(Lb::start_command(
        lb_command(
            &[
                "--listen",
                &listen,
                "--config",
                &config,
                "--control",
                sock.to_str().unwrap(),
            ],
            &[],
        ),
        1,
    ))
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
    let children: Vec<u32> =
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
    assert_eq!(children.len(), 2, "nginx's two workers");
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
