//! Faults an operator meets, and the master keeps serving through them:
//! stray signals, a stderr that is full or gone.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Starts lb with its stderr a pipe the test controls (not read by a
/// capture thread; `pipe_size` shrinks it at once); waits through the
/// control socket until `workers` are ready. Returns the master, the read
/// end of its stderr and its control socket.
fn lb_with_raw_stderr(
    dir: &std::path::Path,
    args: &[&str],
    workers: usize,
    pipe_size: Option<i32>,
) -> (std::process::Child, std::process::ChildStderr, String) {
    let control = dir.join("lb.sock").to_str().unwrap().to_string();
    let mut full = vec!["--listen", "127.0.0.1:0", "--control", &control];
    full.extend_from_slice(args);
    let mut cmd: Command = lb_command(&full, &[]);
    cmd.stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start lb");
    let stderr = child.stderr.take().unwrap();
    if let Some(size) = pipe_size {
        nix::fcntl::fcntl(&stderr, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while status_or_none(&control).is_none_or(|s| {
        s["workers"]
            .as_array()
            .is_none_or(|w| w.iter().filter(|w| w["state"] == "ready").count() < workers)
    }) {
        assert!(
            Instant::now() < deadline,
            "lb never had {workers} ready workers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, stderr, control)
}

fn status_or_none(control: &str) -> Option<serde_json::Value> {
    let out = Command::new(lb_bin())
        .args(["status", "--json", "--control", control])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn status(control: &str) -> serde_json::Value {
    let out = Command::new(lb_bin())
        .args(["status", "--json", "--control", control])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn address(status: &serde_json::Value) -> std::net::SocketAddr {
    status["listen"].as_str().unwrap().parse().unwrap()
}

/// Kills slot 0's worker with SIGKILL and waits (bounded, through the
/// control socket) until a new one is ready in its place.
fn kill_and_see_it_restarted(control: &str) {
    let pid_of_0 = |s: &serde_json::Value| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["slot"] == 0 && w["state"] == "ready")
            .and_then(|w| w["pid"].as_u64())
    };
    let victim = pid_of_0(&status(control)).expect("slot 0 ready") as u32;
    send_signal(victim, libc::SIGKILL);
    let deadline = Instant::now() + WAIT;
    while pid_of_0(&status(control)).is_none_or(|p| p as u32 == victim) {
        assert!(
            Instant::now() < deadline,
            "the killed worker was never restarted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: std::process::Child) -> std::process::ExitStatus {
    send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb did not act on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `lb … 2>&1 | head -1`, a log shipper that restarts: the reader of lb's
/// stderr goes away. lb used to panic on the next line (exit 101) and take
/// every worker with it.
#[test]
fn a_vanished_stderr_does_not_take_lb_down() {
    let dir = scratch("faults-stderr-gone");
    let (child, stderr, control) = lb_with_raw_stderr(&dir, &["--workers", "2"], 2, None);
    drop(stderr);
    // Each of these makes lb log lines nobody reads.
    kill_and_see_it_restarted(&control);
    let addr = address(&status(&control));
    for _ in 0..20 {
        assert!(get(addr, "/").starts_with("hello from worker"));
    }
    assert_eq!(stop(child).code(), Some(0), "drained and exited cleanly");
}

/// A stderr pipe that is full and not read (a stalled log shipper): lb
/// used to block in its log write, so a killed worker was never restarted,
/// `lb status` timed out and SIGTERM was not acted on. Now lines that do
/// not fit are dropped and counted, and a line says so once the pipe is
/// read again.
#[test]
fn a_full_stderr_blocks_neither_supervision_nor_serving() {
    let dir = scratch("faults-stderr-full");
    // A worker that writes far more than the pipe and the log queue hold.
    let flood = python_worker(
        &dir,
        "flood.py",
        "for i in range(30000):\n    print('flood line %d' % i)\nsys.stdout.flush()\nsend(16)\nserve_forever()",
    );
    // Shrunk at once, the pipe is full long before the workers are ready.
    let args = ["--workers", "2", "--", "python3", flood.as_str()];
    let (child, stderr, control) = lb_with_raw_stderr(&dir, &args, 2, Some(4096));
    kill_and_see_it_restarted(&control);
    let addr = address(&status(&control));
    for _ in 0..40 {
        assert!(get(addr, "/").starts_with("hello from worker"));
    }
    // Read the pipe again: the master says what it dropped.
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("log lines were dropped"))
    });
    assert_eq!(stop(child).code(), Some(0), "SIGTERM acted on, drained");
    let said = reader.join().unwrap();
    assert!(said.is_some(), "no line said how many were dropped");
}

/// Every signal a user or a tool may send has a defined effect, and none
/// that is not meant to stop lb stops it: USR1 (logrotate's postrotate)
/// reopens the worker log, the rest are logged and ignored. They used to
/// kill the master and every worker (exit 138 for USR1), or stop it (TSTP).
#[test]
fn stray_signals_are_logged_and_ignored_and_usr1_reopens_the_worker_log() {
    let dir = scratch("faults-signals");
    let log = dir.join("workers.log");
    let rotated = dir.join("workers.log.1");
    let worker = python_worker(
        &dir,
        "chatty.py",
        "send(16)\nwhile True:\n    msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)\n    if not msg or msg[1] == 2:\n        break\n    if fds:\n        print('served one', flush=True)\n        serve_one(fds[0])",
    );
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--worker-log",
            log.to_str().unwrap(),
            "--",
            "python3",
            &worker,
        ],
        &[],
        1,
    );
    let worker_pid = lb.pid_of_slot(0);
    // (SIGUSR2 upgrades lb in place: tests/it/upgrade.rs.)
    let ignored = [
        libc::SIGALRM,
        libc::SIGPROF,
        libc::SIGVTALRM,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGPWR,
        libc::SIGSYS,
        libc::SIGSTKFLT,
        libc::SIGTRAP,
        libc::SIGTSTP,
    ];
    for sig in ignored {
        lb.signal(sig);
        let name = nix::sys::signal::Signal::try_from(sig).unwrap().as_str();
        lb.wait_log(&format!("{name} ignored"), 1);
        assert!(
            get(lb.addr, "/").starts_with("hello from worker 0"),
            "{name}"
        );
    }
    assert_eq!(lb.pid_of_slot(0), worker_pid, "no worker was touched");
    let state = std::fs::read_to_string(format!("/proc/{}/stat", lb.pid())).unwrap();
    assert!(!state.contains(") T "), "lb is not stopped: {state}");
    // logrotate's way: move the file, then SIGUSR1.
    std::fs::rename(&log, &rotated).unwrap();
    lb.signal(libc::SIGUSR1);
    lb.wait_log(&format!("SIGUSR1: reopened {}", log.display()), 1);
    get(lb.addr, "/");
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("served one")) {
        assert!(
            Instant::now() < deadline,
            "nothing was written to the new log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("served one")
    );
}

/// The pids of live processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
                && alive(*pid)
        })
        .collect()
}

/// A Python worker that starts `sleep <marker>` (a child that must not
/// outlive it), says READY, then runs `then`.
fn parent_of_a_sleep(dir: &std::path::Path, marker: &str, then: &str) -> String {
    python_worker(
        dir,
        // (Not the marker itself: the worker's command line would match.)
        &format!("parent-of-{}.py", marker.replace('.', "-")),
        &format!("import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nsend(16)\n{then}"),
    )
}

/// Waits (bounded) until `n` live processes have `marker` in their command
/// line (a worker's children, started before it said READY).
fn wait_for_with(marker: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = processes_with(marker);
        if found.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{marker}: {found:?}, not {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until no live process has `marker` in its command line;
/// ends (by pid) and complains about any that is left.
fn wait_none_with(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for pid in &left {
                send_signal(*pid, libc::SIGKILL);
            }
            panic!("{what}: {left:?} outlived their worker");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker's children go with it, on every path lb ends it by: the ready
/// timeout, the drain timeout, its own exit, and the master's death by
/// SIGKILL (through the group reaper). lb used to kill the worker's pid
/// only: the `sleep`s it had started lived on.
#[test]
fn a_workers_children_do_not_outlive_it() {
    let dir = scratch("faults-children");
    // Never ready: killed at the ready timeout, again and again, until lb
    // gives up.
    let (_, log) = run_to_exit(
        &[
            "--workers",
            "1",
            "--ready-timeout",
            "300ms",
            "--",
            "sh",
            "-c",
            "sleep 77.4241; true",
        ],
        &[],
    );
    assert!(log.contains("not ready within"), "{log}");
    wait_none_with("77.4241", "ready timeout");

    // Ready, but deaf to DRAIN: killed at the drain timeout.
    let deaf = parent_of_a_sleep(&dir, "77.4242", "while True:\n    time.sleep(1)");
    let mut lb = Lb::start(
        &[
            "--workers",
            "1",
            "--drain-timeout",
            "500ms",
            "--",
            "python3",
            &deaf,
        ],
        &[],
        1,
    );
    wait_for_with("77.4242", 1);
    lb.signal(libc::SIGTERM);
    lb.wait_exit();
    wait_none_with("77.4242", "drain timeout");

    // Drains and exits by itself, leaving its child behind.
    let leaver = parent_of_a_sleep(&dir, "77.4243", "serve_forever()");
    let mut lb = Lb::start(&["--workers", "1", "--", "python3", &leaver], &[], 1);
    wait_for_with("77.4243", 1);
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    wait_none_with("77.4243", "its own exit");

    // The master is killed outright: its workers die with it, and the
    // reaper ends what they started.
    let starter = parent_of_a_sleep(&dir, "77.4244", "serve_forever()");
    let mut lb = Lb::start(&["--workers", "2", "--", "python3", &starter], &[], 2);
    wait_for_with("77.4244", 2);
    lb.signal(libc::SIGKILL);
    lb.wait_exit();
    wait_none_with("77.4244", "the master's SIGKILL");
}

/// A worker cannot flood lb's log or forge its lines: what it makes lb
/// log (messages) is limited per worker, with a count of what was not
/// logged, and every control character it sends is escaped. One worker's
/// messages used to write 1.97M lines in 20 s, and a payload with a
/// newline printed a line of its own that looked like lb's.
#[test]
fn a_worker_can_neither_flood_nor_forge_lbs_log() {
    let dir = scratch("faults-log");
    let worker = python_worker(
        &dir,
        "noisy.py",
        r#"send(16)
send(32, 0, b"x\nlb: worker 0 pid 1 gen 1: exit (killed by SIGKILL, up 1.0s, unexpected)")
print("out\r\x1b[2Klb: forged too", flush=True)
for i in range(20000):
    send(32, 0, b"flood %d" % i)
time.sleep(1.2)
send(32, 0, b"last")
serve_forever()"#,
    );
    let lb = Lb::start(&["--workers", "1", "--", "python3", &worker], &[], 1);
    lb.wait_log("message: last", 1);
    let lines = lb.log.lines();
    let floods = lines
        .iter()
        .filter(|l| l.contains("message: flood"))
        .count();
    assert!(floods <= 200, "{floods} flood lines logged");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("lines not logged (more than 100 a second)")),
        "the suppressed lines are counted"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("lb: worker 0 pid 1 gen")),
        "a forged line: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("message: x\\nlb: worker 0 pid 1"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("out\\r\\x1b[2Klb: forged too"))
    );
}

/// Two pools, round-robin: `python3 <script>` (1 worker) beside the bundled
/// worker (1), with `extra` top-level settings.
fn beside_a_healthy_worker(dir: &std::path::Path, script: &str, extra: &str) -> Lb {
    let config = write_config(
        dir,
        "lb.toml",
        &format!(
            "{extra}\n{}{}",
            python_pool("odd", script, 1),
            hello_pool("hello", 1)
        ),
    );
    Lb::start(&["--config", &config], &[], 2)
}

/// A worker that stops reading its channel used to swallow every
/// connection sent to it until it was killed (278 hung; 39 requests in 5 s
/// from 10 clients; status "ready"; nothing logged). Its channel now holds
/// `worker_queue` connections at most, so it is skipped once that is full,
/// and after `stall_timeout` without taking one its queue goes to the
/// others and it is replaced, successor first: no request fails.
#[test]
fn a_worker_that_stops_reading_costs_no_request() {
    use crate::util::load::{Load, Style};
    let dir = scratch("faults-stuck");
    let stuck = python_worker(
        &dir,
        "stuck.py",
        "send(16)\nfor _ in range(3):\n    msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)\n    serve_one(fds[0])\nwhile True:\n    time.sleep(1)",
    );
    let lb = beside_a_healthy_worker(&dir, &stuck, "worker_queue = 8\nstall_timeout = \"2s\"");
    let load = Load::start(lb.addr, 10, Style::Close, None);
    lb.wait_log("took none of its", 1);
    lb.wait_log("replacing it, its successor ready first", 1);
    load.wait_more(500);
    let tally = load.stop();
    eprintln!("a stuck worker: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
    assert!(tally.ok > 1000, "the others kept serving: {tally:?}");
}

/// A worker that closes its channel (fd 3) but lives on: the master's own
/// copy of the channel hides the EOF. lb notices (within about a second
/// of no progress), hands what waits for it to the others, replaces it.
#[test]
fn a_worker_that_closes_its_channel_costs_no_request() {
    use crate::util::load::{Load, Style};
    let dir = scratch("faults-closed-fd3");
    let closer = python_worker(
        &dir,
        "closer.py",
        "send(16)\nchan.close()\nwhile True:\n    time.sleep(1)",
    );
    let lb = beside_a_healthy_worker(&dir, &closer, "");
    let started = Instant::now();
    let load = Load::start(lb.addr, 10, Style::Close, None);
    lb.wait_log("closed its channel (fd 3)", 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    load.wait_more(500);
    let tally = load.stop();
    eprintln!("a worker without its channel: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
}

/// A worker near its open-files limit stops taking connections (so the
/// master, finding its channel full, sends them to the others) instead of
/// receiving ones whose fds the kernel cannot give it, which are lost (all
/// 132,380 requests failed, silently, under `prlimit --nofile=128` with 500
/// idle connections held). What already waits for it goes to the others
/// once it stalls.
#[test]
fn a_worker_at_its_fd_limit_takes_no_connection_it_cannot_hold() {
    use crate::util::load::{Load, Style};
    if !installed("prlimit", "the fd-limit test") {
        return;
    }
    let dir = scratch("faults-nofile");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "worker_queue = 4\nstall_timeout = \"2s\"\n\
             [[pool]]\nname = \"tight\"\ncommand = \"prlimit\"\n\
             args = [\"--nofile=32\", \"{}\", \"hello-worker\"]\ncount = 1\n{}",
            lb_bin(),
            hello_pool("roomy", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 2);
    // 80 kept-alive clients hold 80 connections: far more than the tight one can.
    let held = Load::start(lb.addr, 80, Style::KeepAlive, None);
    held.wait_more(2000);
    let fresh = Load::start(lb.addr, 10, Style::Close, None);
    fresh.wait_more(1000);
    let (held, fresh) = (held.stop(), fresh.stop());
    eprintln!("held {held:?}\nfresh {fresh:?}");
    assert_eq!(held.failed, 0, "{:?}", held.first);
    assert_eq!(fresh.failed, 0, "{:?}", fresh.first);
    lb.wait_log("near the limit of 32 open files", 1);
}

/// The same behind the accept shim: near the limit the server's accept()
/// says EMFILE, as it would without lb, and the connection stays in the
/// channel instead of being received without its fd and lost.
#[test]
fn a_shim_server_at_its_fd_limit_loses_no_connection() {
    use crate::util::load::{Load, Style};
    if !installed("prlimit", "the shim fd-limit test") {
        return;
    }
    let dir = scratch("faults-shim-nofile");
    let server = epoll_server();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "worker_queue = 4\nstall_timeout = \"2s\"\nmode = \"shim\"\n\
             [[pool]]\nname = \"tight\"\ncommand = \"prlimit\"\n\
             args = [\"--nofile=48\", \"{server}\", \"{{port}}\"]\ncount = 1\n\
             [[pool]]\nname = \"roomy\"\ncommand = \"{server}\"\nargs = [\"{{port}}\"]\ncount = 1\n"
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 2);
    let held = Load::start(lb.addr, 80, Style::KeepAlive, None);
    held.wait_more(2000);
    let fresh = Load::start(lb.addr, 10, Style::Close, None);
    fresh.wait_more(1000);
    let (held, fresh) = (held.stop(), fresh.stop());
    eprintln!("held {held:?}\nfresh {fresh:?}");
    assert_eq!(held.failed, 0, "{:?}", held.first);
    assert_eq!(fresh.failed, 0, "{:?}", fresh.first);
}
