//! `--dispatch kernel` with lb's own protocol: the bundled worker,
//! `examples/hello.c` and `examples/hello.py` take the LISTENER lb sends
//! first and accept from it themselves (`docs/protocol.md` §2, §5). Needs
//! root (or CAP_BPF and CAP_NET_ADMIN): elsewhere the tests say so and skip.

use std::process::Command;

use crate::util::load::{Load, Style, reloads_under_load};
use crate::util::*;

/// Whether the steering program can be loaded here; says why not.
fn bpf() -> bool {
    match lb::dispatch::kernel::Steering::new(lb::policy::PolicyKind::RoundRobin) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: BPF programs cannot be loaded here ({e})");
            false
        }
    }
}

/// The commands of the three workers (none: lb's bundled one).
fn worker(which: &str) -> Vec<String> {
    match which {
        "bundled" => vec![],
        "hello.c" => vec![c_worker()],
        "hello.py" => vec![
            "python3".into(),
            repo().join("examples/hello.py").to_str().unwrap().into(),
        ],
        other => panic!("no worker {other}"),
    }
}

/// Two workers of `which` under kernel dispatch with `policy`.
fn start(which: &str, policy: &str) -> Lb {
    let command = worker(which);
    let mut args = vec!["--workers", "2", "--dispatch", "kernel", "--policy", policy];
    if !command.is_empty() {
        args.push("--");
        args.extend(command.iter().map(String::as_str));
    }
    let lb = Lb::start(&args, &[], 2);
    lb.wait_log("dispatch kernel:", 1);
    lb
}

/// What every run must not have logged: a worker left out of the schedule,
/// or a report the master could not make sense of (a CLOSED before the
/// ACCEPTED that covers it, say).
fn assert_clean(lb: &Lb, what: &str) {
    for bad in ["without taking its own listener", "protocol error"] {
        assert_eq!(lb.log.count(bad), 0, "{what}: logged {bad:?}");
    }
}

/// Keep-alive and `Connection: close` clients, 4 at a time: every request
/// answered.
fn assert_loads_fail_nothing(lb: &Lb, what: &str) {
    for style in [Style::Close, Style::KeepAlive] {
        let tally = Load::start(lb.addr, 4, style, Some(300)).finish();
        assert_eq!(
            (tally.ok, tally.failed),
            (300, 0),
            "{what}, {style:?}: {:?}",
            tally.first
        );
    }
}

fn serves_under_kernel_dispatch(which: &str) {
    if !bpf() {
        return;
    }
    let lb = start(which, "rr");
    // The program hands new connections out in turn; nothing goes
    // through lb.
    assert_eq!(split(lb.addr, 2, 100), [50, 50], "{which}");
    assert_loads_fail_nothing(&lb, which);
    assert!(lb.ctl(&["status", "--json"]).contains("\"dispatched\": 0"));
    assert_clean(&lb, which);
    drop(lb);
    // Least-connections reads the workers' ACCEPTED and CLOSED: once the
    // clients are gone every worker's count is back to 0, and no report
    // came out of order.
    let lb = start(which, "lc");
    assert_loads_fail_nothing(&lb, which);
    lb.wait_all_closed();
    assert_clean(&lb, which);
}

#[test]
fn the_bundled_worker_serves_under_kernel_dispatch() {
    serves_under_kernel_dispatch("bundled");
    if !bpf() || !installed("curl", "the curl keep-alive check") {
        return;
    }
    // curl, a client nobody here wrote, on one kept-alive connection.
    let lb = start("bundled", "rr");
    let url = format!("http://{}/", lb.addr);
    let out = Command::new("timeout")
        .args(["10", "curl", "-sS", "--fail", &url, &url, &url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {out:?}");
    let bodies: Vec<&str> = text.lines().collect();
    assert_eq!(bodies.len(), 3, "{text}");
    // One connection: one worker answered all three.
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "curl's connection was not kept: {text}"
    );
    assert_clean(&lb, "curl");
}

#[test]
fn the_c_example_serves_under_kernel_dispatch() {
    serves_under_kernel_dispatch("hello.c");
}

#[test]
fn the_python_example_serves_under_kernel_dispatch() {
    serves_under_kernel_dispatch("hello.py");
}

#[test]
fn kernel_dispatch_weighs_native_pools() {
    if !bpf() {
        return;
    }
    let dir = scratch("kernel-native-wrr");
    let text = format!(
        "{}weight = 1\n{}weight = 3\n",
        hello_pool("web", 1),
        hello_pool("canary", 1)
    );
    let config = write_config(&dir, "lb.toml", &text);
    let lb = Lb::start(
        &[
            "--config",
            &config,
            "--dispatch",
            "kernel",
            "--policy",
            "wrr",
        ],
        &[],
        2,
    );
    assert_eq!(split(lb.addr, 2, 400), [100, 300]);
    assert_clean(&lb, "wrr");
}

/// Each new worker takes its own listener, each old one stops its own at
/// DRAIN (what was queued there moves) and drains its kept-alive clients:
/// nobody notices.
#[test]
fn a_rolling_reload_under_kernel_dispatch_loses_nothing() {
    if !bpf() {
        return;
    }
    let lb = start("bundled", "rr");
    for (style, generations) in [(Style::KeepAlive, 2..=3), (Style::Close, 4..=5)] {
        let tally = reloads_under_load(&lb, 8, style, 2, generations);
        assert_eq!(tally.failed, 0, "{style:?}: {:?}", tally.first);
    }
    assert_clean(&lb, "reloads");
}

/// Only what the killed worker had accepted can fail; what was queued in
/// its listener moves to the other.
#[test]
fn kill_9_under_kernel_dispatch_fails_only_what_the_worker_held() {
    if !bpf() {
        return;
    }
    let lb = start("bundled", "rr");
    kill_under_load(&lb, 0, 2, "kernel native");
    assert_clean(&lb, "kill -9");
}

/// A worker older than LISTENER (READY 0, the listener ignored) is logged
/// and never in the kernel's schedule: the one that takes its listener
/// serves every connection.
#[test]
fn a_worker_that_ignores_its_listener_gets_no_connections() {
    if !bpf() {
        return;
    }
    let dir = scratch("kernel-native-old");
    let old = python_worker(
        &dir,
        "old.py",
        "send(16, 0)\nprint('old-style worker up', flush=True)\nserve_forever()",
    );
    let text = format!("{}{}", python_pool("old", &old, 1), hello_pool("new", 1));
    let config = write_config(&dir, "lb.toml", &text);
    let lb = Lb::start(&["--config", &config, "--dispatch", "kernel"], &[], 1);
    lb.wait_log("old-style worker up", 1);
    lb.wait_log("said READY without taking its own listener", 1);
    assert_eq!(split(lb.addr, 2, 60), [0, 60]);
    let tally = Load::start(lb.addr, 4, Style::Close, Some(200)).finish();
    assert_eq!((tally.ok, tally.failed), (200, 0), "{:?}", tally.first);
}
