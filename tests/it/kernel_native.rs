//! `--dispatch kernel` with lb's own protocol: the bundled worker,
//! `examples/hello.c` and `examples/hello.py` take the LISTENER lb sends
//! first and accept from it themselves (`docs/protocol.md` §2, §5). Needs
//! root (or CAP_BPF and CAP_NET_ADMIN): elsewhere the tests say so and skip.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    for which in ["bundled", "hello.c", "hello.py"] {
        let lb = start(which, "rr");
        for (style, generations) in [(Style::KeepAlive, 2..=4), (Style::Close, 5..=7)] {
            let tally = reloads_under_load(&lb, 8, style, 2, generations);
            assert_eq!(tally.failed, 0, "{which}, {style:?}: {:?}", tally.first);
        }
        assert_clean(&lb, which);
    }
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

/// The benchmark backend (`scripts/bench/backend.c`) batches ACCEPTED and
/// CLOSED per loop: least-connections' counts come back to 0 and nothing
/// is out of order.
#[test]
fn the_bench_backend_reports_in_order_under_kernel_dispatch() {
    if !bpf() {
        return;
    }
    let backend = scratch("kernel-native-backend").join("backend");
    let status = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&backend)
        .arg(repo().join("scripts/bench/backend.c"))
        .status()
        .expect("gcc is needed to build scripts/bench/backend.c");
    assert!(status.success(), "scripts/bench/backend.c did not compile");
    let backend = backend.to_str().unwrap();
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--dispatch",
            "kernel",
            "--policy",
            "lc",
            "--",
            backend,
        ],
        &[],
        2,
    );
    assert_loads_fail_nothing(&lb, "backend");
    lb.wait_all_closed();
    assert_clean(&lb, "backend");
}

/// Near its open-files limit a worker accepts no more (it would get no fd,
/// or fail): what the kernel steers to it waits in its listener's queue,
/// and is served once held connections close. Nothing is lost.
#[test]
fn a_worker_at_its_fd_limit_leaves_connections_queued_not_lost() {
    if !bpf() || !installed("prlimit", "the kernel-dispatch fd-limit test") {
        return;
    }
    let dir = scratch("kernel-native-nofile");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"tight\"\ncommand = \"prlimit\"\n\
             args = [\"--nofile=32\", \"{}\", \"hello-worker\"]\ncount = 1\n",
            lb_bin()
        ),
    );
    let lb = Lb::start(&["--config", &config, "--dispatch", "kernel"], &[], 1);
    // 24 kept-alive clients: more than 32 files minus the reserve can hold.
    const CLIENTS: usize = 24;
    let answered = Arc::new(AtomicUsize::new(0));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Arc::new(std::sync::Mutex::new(released));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (addr, answered, released) =
                (lb.addr, Arc::clone(&answered), Arc::clone(&released));
            std::thread::spawn(move || {
                let mut c = KeepAlive::open(addr);
                let body = c.get("/");
                answered.fetch_add(1, Ordering::Relaxed);
                // Held until the test lets one go.
                let _ = released.lock().unwrap().recv_timeout(WAIT);
                body
            })
        })
        .collect();
    lb.wait_log("near the limit of 32 open files", 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = answered.load(Ordering::Relaxed);
    assert!(
        (1..CLIENTS).contains(&held),
        "{held} of {CLIENTS} answered at the limit"
    );
    // Let them go one by one: each close makes room for one that waits.
    for _ in 0..CLIENTS {
        release.send(()).unwrap();
    }
    for c in clients {
        let body = c.join().expect("a client failed");
        assert_eq!(slot_of(&body), 0);
    }
    assert_eq!(answered.load(Ordering::Relaxed), CLIENTS);
    assert_clean(&lb, "fd limit");
}
