//! The control socket: `lb status` (table and JSON), `lb stop`, `lb send`,
//! permissions, and clear errors when no master answers.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::util::*;

/// Runs `lb <args>` to completion; (exit code, stdout, stderr).
fn lb_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(lb_bin())
        .args(args)
        .env_remove("LB_CONTROL")
        .env_remove("LB_LISTEN")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn status_shows_every_worker_as_a_table_and_as_json() {
    let dir = scratch("status");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let lb = Lb::start(&["--workers", "2", "--control", sock], &[], 2);
    for _ in 0..6 {
        get(lb.addr, "/");
    }
    let (code, json, err) = lb_cli(&["status", "--json", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["pid"], lb.pid());
    assert_eq!(status["listen"], lb.addr.to_string());
    assert_eq!(status["dispatched"], 6);
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for (slot, w) in workers.iter().enumerate() {
        assert_eq!(w["slot"], slot);
        assert_eq!(w["pid"], lb.pid_of_slot(slot));
        assert_eq!(w["state"], "ready");
        assert_eq!(w["total"], 3, "round-robin sent 3 to each");
        assert!(w["rss_bytes"].as_u64().unwrap() > 0);
    }

    let (code, table, _) = lb_cli(&["status", "--control", sock]);
    assert_eq!(code, Some(0));
    assert!(
        table.contains(&format!("listening on {}", lb.addr)),
        "{table}"
    );
    let rows: Vec<&str> = table.lines().filter(|l| l.contains(" ready ")).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].contains(&lb.pid_of_slot(0).to_string()));

    let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");
}

#[test]
fn stop_drains_and_the_master_exits_zero() {
    let dir = scratch("stop");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let mut lb = Lb::start(&["--workers", "2", "--control", sock], &[], 2);
    let (code, out, err) = lb_cli(&["stop", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("draining 2 workers"), "{out}");
    assert_eq!(lb.wait_exit().code(), Some(0));
    assert!(
        !std::path::Path::new(sock).exists(),
        "the socket file is removed"
    );
}

#[test]
fn send_reaches_the_workers() {
    let dir = scratch("send");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let echo = python_worker(
        &dir,
        "echo.py",
        "send(16)\nwhile True:\n    msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)\n    if not msg or msg[1] == 2:\n        break\n    if msg[1] == 32:\n        print('got', msg[16:].decode(), flush=True)",
    );
    let lb = Lb::start(
        &["--workers", "2", "--control", sock, "--", "python3", &echo],
        &[],
        2,
    );
    let (code, out, err) = lb_cli(&["send", "all", "new state", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("sent to 2 workers"), "{out}");
    lb.wait_log("] got new state", 2);
    let (code, _, _) = lb_cli(&["send", "1", "only one", "--control", sock]);
    assert_eq!(code, Some(0));
    lb.wait_log(
        &format!("[worker 1 pid {}] got only one", lb.pid_of_slot(1)),
        1,
    );
    let (code, _, err) = lb_cli(&["send", "5", "x", "--control", sock]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no slot 5"), "{err}");
}

#[test]
fn without_a_master_the_error_is_one_line() {
    let dir = scratch("nomaster");
    let sock = dir.join("none.sock");
    let (code, out, err) = lb_cli(&["status", "--control", sock.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no lb master answers"), "{err}");
}

#[test]
fn a_second_master_on_the_same_control_socket_is_refused() {
    let dir = scratch("twice");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let _first = Lb::start(&["--workers", "1", "--control", sock], &[], 1);
    let (status, log) = run_to_exit(&["--workers", "1", "--control", sock], &[]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("another lb master is already running"),
        "{log}"
    );
}

#[test]
fn reload_under_load_replaces_every_worker_without_a_failed_request() {
    let dir = scratch("reload");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let config = write_config(&dir, "lb.toml", &hello_pool("hello", 3));
    let lb = Lb::start(&["--config", &config, "--control", sock], &[], 3);
    let old: Vec<u32> = (0..3).map(|s| lb.pid_of_slot(s)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    std::thread::sleep(std::time::Duration::from_millis(200)); // load is flowing
    for generation in [2, 3] {
        let (code, out, err) = lb_cli(&["reload", "--control", sock]);
        assert_eq!(code, Some(0), "{err}");
        assert!(
            out.contains(&format!("reloaded 3 workers to generation {generation}")),
            "{out}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed += f;
    }
    eprintln!("reload x2 under load: {ok} requests served, {failed} failed");
    assert_eq!(failed, 0, "no request fails during a reload");
    assert!(ok > 100, "load kept flowing: {ok}");
    let (_, json, _) = lb_cli(&["status", "--json", "--control", sock]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["generation"], 3);
        assert_eq!(w["state"], "ready");
        assert!(!old.contains(&(w["pid"].as_u64().unwrap() as u32)));
    }
    assert_eq!(
        lb.log.count("gen 1: exit (exit code 0"),
        3,
        "old workers drained"
    );
}

#[test]
fn a_reload_whose_new_workers_never_get_ready_keeps_the_old_ones() {
    let dir = scratch("reload-fail");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let config = write_config(&dir, "lb.toml", &hello_pool("hello", 2));
    let lb = Lb::start(
        &[
            "--config",
            &config,
            "--control",
            sock,
            "--ready-timeout",
            "300ms",
        ],
        &[],
        2,
    );
    let old: Vec<u32> = (0..2).map(|s| lb.pid_of_slot(s)).collect();
    // The new configuration's workers never say READY.
    write_config(
        &dir,
        "lb.toml",
        "[[pool]]\nname = \"silent\"\ncommand = \"sleep\"\nargs = [\"60\"]\ncount = 2\n",
    );
    let (code, _, err) = lb_cli(&["reload", "--control", sock]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("reload failed") && err.contains("not ready within 0.3s"),
        "{err}"
    );
    // The old workers still serve, and are still what status shows.
    let served: std::collections::HashSet<u32> =
        (0..6).map(|_| pid_of(&get(lb.addr, "/"))).collect();
    assert_eq!(served, old.iter().copied().collect());
    let (_, json, _) = lb_cli(&["status", "--json", "--control", sock]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pids: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, old.iter().map(|&p| u64::from(p)).collect::<Vec<_>>());
    // A bad configuration is refused whole, with nothing changed.
    write_config(&dir, "lb.toml", "[[pool]]\ncommand = \"sh\"\ncout = 1\n");
    let (code, _, err) = lb_cli(&["reload", "--control", sock]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cout") && err.contains("nothing changed"),
        "{err}"
    );
}

#[test]
fn sighup_reloads_too() {
    let lb = Lb::start(&["--workers", "1"], &[], 1);
    let old = lb.pid_of_slot(0);
    lb.signal(libc::SIGHUP);
    lb.wait_log("reloaded 1 workers to generation 2", 1);
    assert_ne!(pid_of(&get(lb.addr, "/")), old);
}

#[test]
fn scaling_up_and_down_under_load_fails_no_request() {
    let dir = scratch("scale");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let lb = Lb::start(&["--workers", "2", "--control", sock], &[], 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    let (code, out, err) = lb_cli(&["scale", "+2", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("scaled from 2 to 4 workers"), "{out}");
    lb.wait_ready(4);
    // The new workers take connections.
    let served: std::collections::HashSet<usize> =
        (0..40).map(|_| slot_of(&get(lb.addr, "/"))).collect();
    assert_eq!(served, (0..4).collect());
    let (code, out, err) = lb_cli(&["scale", "-3", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("scaled from 4 to 1 workers (3 draining)"),
        "{out}"
    );
    lb.wait_log("exit (exit code 0", 3);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed: u64 = clients.into_iter().map(|c| c.join().unwrap().1).sum();
    assert_eq!(failed, 0, "no request fails while scaling");
    assert!((0..10).all(|_| slot_of(&get(lb.addr, "/")) == 0));
    let (_, json, _) = lb_cli(&["status", "--json", "--control", sock]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);

    let (code, _, err) = lb_cli(&["scale", "0", "--control", sock]);
    assert_eq!(code, Some(1));
    assert!(err.contains("from 1 to"), "{err}");
    let (code, _, err) = lb_cli(&["scale", "many", "--control", sock]);
    assert_eq!(code, Some(2));
    assert!(err.contains("give N, +N or -N"), "{err}");
}

#[test]
fn sigttin_and_sigttou_add_and_remove_a_worker() {
    let lb = Lb::start(&["--workers", "1"], &[], 1);
    lb.signal(libc::SIGTTIN);
    lb.wait_log("SIGTTIN: scaled from 1 to 2 workers", 1);
    lb.wait_ready(2);
    lb.signal(libc::SIGTTOU);
    lb.wait_log("SIGTTOU: scaled from 2 to 1 workers", 1);
    lb.wait_log("exit (exit code 0", 1);
    // Still running, not stopped by the job-control signals' default action.
    assert_eq!(slot_of(&get(lb.addr, "/")), 0);
}

#[test]
fn scaling_a_multi_pool_master_is_refused_with_the_reason() {
    let dir = scratch("scale-pools");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!("{}{}", hello_pool("a", 1), hello_pool("b", 1)),
    );
    let _lb = Lb::start(&["--config", &config, "--control", sock], &[], 2);
    let (code, _, err) = lb_cli(&["scale", "+1", "--control", sock]);
    assert_eq!(code, Some(1));
    assert!(err.contains("2 pools"), "{err}");
}

/// GET `path` from `addr`; (status line, body).
fn http(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let lb = Lb::start(&["--workers", "2", "--metrics", "127.0.0.1:0"], &[], 2);
    for _ in 0..10 {
        get(lb.addr, "/");
    }
    let addr = lb.metrics_addr();
    let (status, body) = http(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let samples: std::collections::HashMap<String, f64> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect();
    assert_eq!(samples["lb_connections_accepted_total"], 10.0);
    assert_eq!(samples["lb_connections_dispatched_total"], 10.0);
    assert_eq!(samples["lb_workers"], 2.0);
    for slot in 0..2 {
        let pid = lb.pid_of_slot(slot);
        let key = format!("lb_worker_connections_total{{pool=\"hello\",slot=\"{slot}\"}}");
        assert_eq!(samples[&key], 5.0, "{key}");
        let state = format!("lb_worker_state{{pool=\"hello\",slot=\"{slot}\",state=\"ready\"}}");
        assert_eq!(samples[&state], 1.0);
        let key = format!("lb_worker_pid{{pool=\"hello\",slot=\"{slot}\"}}");
        assert_eq!(samples[&key], f64::from(pid), "{key}");
    }
    // A proper histogram: cumulative buckets, +Inf = count = connections.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("lb_dispatch_latency_seconds_bucket"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), 10.0);
    assert_eq!(samples["lb_dispatch_latency_seconds_count"], 10.0);
    assert!(samples["lb_dispatch_latency_seconds_sum"] > 0.0);
    // Round-robin reads no close reports and the bundled worker sends none
    // then: the open connections are unknown, and have no sample.
    assert!(
        !samples
            .keys()
            .any(|k| k.starts_with("lb_worker_active_connections")),
        "{body}"
    );
    let (status, _) = http(&addr, "/elsewhere");
    assert!(status.contains("404"), "{status}");
}

/// `LB_REPORT_CLOSED=0` (rr, wrr) lets workers skip close reports, and the
/// bundled worker does: status must not show sent − closed (= total) as
/// open connections. Under lc the reports come and the count is exact.
#[test]
fn open_connections_are_unknown_when_no_close_reports_are_read() {
    for policy in ["rr", "lc"] {
        let lb = Lb::start(&["--workers", "2", "--policy", policy], &[], 2);
        for _ in 0..6 {
            get(lb.addr, "/");
        }
        if policy == "lc" {
            // (The split depends on when each close report arrives.)
            let totals = lb.wait_all_closed();
            assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 6, "{totals:?}");
            continue;
        }
        let status = lb.status();
        for w in status["workers"].as_array().unwrap() {
            assert_eq!(w["total"], 3, "{status}");
            assert!(w["active"].is_null(), "unknown, not 3: {status}");
        }
        let table = lb.ctl(&["status"]);
        for row in table.lines().filter(|l| l.contains(" ready ")) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // (slot, pool, pid, gen, state, uptime, restarts, active, total)
            assert_eq!((cols[7], cols[8]), ("-", "3"), "{table}");
        }
    }
}

#[test]
fn a_parallel_reload_replaces_two_at_a_time_without_a_failed_request() {
    let dir = scratch("reload-parallel");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let lb = Lb::start(
        &[
            "--workers",
            "4",
            "--reload-parallel",
            "2",
            "--control",
            sock,
        ],
        &[],
        4,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    let (code, out, err) = lb_cli(&["reload", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("reloaded 4 workers to generation 2"), "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed: u64 = clients.into_iter().map(|c| c.join().unwrap().1).sum();
    assert_eq!(failed, 0);
    let lines = lb.log.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reloading 4 workers to generation 2, 2 at a time"))
    );
    // Two new workers were started before the first of them was ready.
    let first_ready = lines
        .iter()
        .position(|l| l.contains("gen 2: ready"))
        .unwrap();
    let spawned_before = lines[..first_ready]
        .iter()
        .filter(|l| l.contains("gen 2: spawn"))
        .count();
    assert_eq!(spawned_before, 2, "{}", lines.join("\n"));
}

/// `lb reload` returns once every slot has switched, while a replaced
/// worker may still be finishing a request; `--wait` returns only once the
/// replaced workers have exited.
#[test]
fn reload_returns_at_the_switch_and_reload_wait_once_the_old_are_gone() {
    let lb = Lb::start(&["--workers", "1"], &[], 1);
    for (generation, wait) in [(2, false), (3, true)] {
        let old = lb.pid_of_slot(0);
        let addr = lb.addr;
        let slow = std::thread::spawn(move || read_body(send_request_to(addr, "/sleep/1500")));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let args: &[&str] = if wait {
            &["reload", "--wait"]
        } else {
            &["reload"]
        };
        let out = lb.ctl(args);
        assert!(
            out.contains(&format!("reloaded 1 workers to generation {generation}")),
            "{out}"
        );
        if wait {
            assert!(out.contains("every replaced worker has drained"), "{out}");
            assert!(!alive(old), "--wait returned before {old} exited");
        } else {
            assert!(alive(old), "the old worker is still finishing its request");
            let status = lb.status();
            let states: Vec<&str> = status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["state"].as_str().unwrap())
                .collect();
            assert!(states.contains(&"draining"), "{status}");
        }
        assert!(
            slow.join()
                .unwrap()
                .unwrap()
                .starts_with("hello from worker 0")
        );
    }
}

/// A child process that is killed (by its pid) and reaped if a test ends
/// before it did.
struct Reaped(std::process::Child);

impl Reaped {
    fn spawn(mut cmd: Command) -> Reaped {
        Reaped(
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn"),
        )
    }

    /// Waits (bounded by `WAIT`) for the exit; (exit code, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), out, err)
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            send_signal(self.0.id(), libc::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

/// `lb_cli`, timed.
fn timed_cli(args: &[&str]) -> (std::time::Duration, Option<i32>, String, String) {
    let start = std::time::Instant::now();
    let (code, out, err) = lb_cli(args);
    (start.elapsed(), code, out, err)
}

/// How long a control request may take to be answered while the master is
/// busy with something else (idle clients, a reload): well under the 5 s a
/// client used to wait behind each of them, with room for a loaded machine.
const PROMPT: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects `n` more clients that send nothing (non-blocking connects,
/// retried while the master's backlog is full, bounded).
fn idle_clients(sock: &str, n: usize, into: &mut Vec<socket2::Socket>) {
    let addr = socket2::SockAddr::unix(sock).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while into.len() < n && std::time::Instant::now() < deadline {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        match s.connect(&addr) {
            Ok(()) => into.push(s),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

#[test]
fn status_answers_while_idle_clients_hold_the_control_socket() {
    let dir = scratch("idle");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let lb = Lb::start(&["--workers", "1", "--control", sock], &[], 1);
    let mut idle = Vec::new();
    // 50 idle clients, then more than the master keeps waiting at once.
    for n in [50, 300] {
        idle_clients(sock, n, &mut idle);
        let (took, code, json, err) = timed_cli(&["status", "--json", "--control", sock]);
        assert_eq!(code, Some(0), "with {} idle clients: {err}", idle.len());
        assert!(
            took < PROMPT,
            "status took {took:?} with {} idle clients",
            idle.len()
        );
        let status: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(status["pid"], lb.pid());
    }
    // The first idle client is let go (with a reason) within a few seconds.
    let first = &idle[0];
    first.set_nonblocking(false).unwrap();
    first
        .set_read_timeout(Some(std::time::Duration::from_secs(4)))
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(first), &mut line)
        .expect("an idle client is answered and closed, not kept");
    let answer: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(answer["ok"], false, "{line}");
}

#[test]
fn status_and_stop_are_answered_while_a_reload_runs() {
    let dir = scratch("reload-busy");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    // The second generation takes 6 s to become ready.
    let slow = python_worker(
        &dir,
        "slow.py",
        "if os.environ['LB_GENERATION'] != '1':\n    time.sleep(6)\nsend(16)\nserve_forever()",
    );
    let mut lb = Lb::start(
        &[
            "--workers",
            "1",
            "--drain-timeout",
            "1s",
            "--control",
            sock,
            "--",
            "python3",
            &slow,
        ],
        &[],
        1,
    );
    let mut reload = Command::new(lb_bin());
    reload.args(["reload", "--control", sock]);
    let reload = Reaped::spawn(reload);
    lb.wait_log("gen 2: spawn", 1);

    let (took, code, json, err) = timed_cli(&["status", "--json", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(took < PROMPT, "status took {took:?} during a reload");
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let states: Vec<&str> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"starting"), "{json}");

    let (took, code, out, err) = timed_cli(&["stop", "--control", sock]);
    assert_eq!(code, Some(0), "{err}");
    assert!(took < PROMPT, "stop took {took:?} during a reload");
    assert!(out.contains("draining"), "{out}");
    // The reload's own client is told why it ended.
    let (code, _, err) = reload.finish();
    assert_eq!(code, Some(1));
    assert!(err.contains("the master is stopping"), "{err}");
    lb.wait_exit();
}

#[test]
fn a_request_that_is_not_utf8_gets_an_error_reply() {
    use std::io::{BufRead, Write};
    let dir = scratch("utf8");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let _lb = Lb::start(&["--workers", "1", "--control", sock], &[], 1);
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"{\"cmd\":\"st\xffatus\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .expect("an answer, not silence");
    let answer: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(answer["ok"], false, "{line}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("UTF-8"), "{error}");
}

const NOBODY: u32 = 65534;

/// Whether this test can run processes as uid 65534 (it needs root and
/// `setpriv`); says why it is skipped if not.
fn can_be_nobody(why: &str) -> bool {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipping {why}: the tests do not run as root");
        return false;
    }
    installed("setpriv", why)
}

/// `setpriv` arguments that run the rest as uid/gid 65534.
const AS_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// `lb <args>` run as uid 65534 without XDG_RUNTIME_DIR or LB_*.
fn lb_as_nobody(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(AS_NOBODY[0]);
    cmd.args(&AS_NOBODY[1..]).arg(lb_bin()).args(args);
    cmd.env_remove("XDG_RUNTIME_DIR")
        .env_remove("LB_CONTROL")
        .env_remove("LB_LISTEN");
    Reaped::spawn(cmd).finish()
}

#[test]
fn a_socket_served_by_another_uid_is_not_believed() {
    if !can_be_nobody("the squatted control socket test") {
        return;
    }
    let dir = scratch("squat").join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("lb.sock");
    let _ = std::fs::remove_file(&sock);
    let sock = sock.to_str().unwrap();
    // Another user binds the path first and says yes to everything.
    let forger = "import os, socket, sys\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
        s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(16)\n\
        while True:\n    c, _ = s.accept()\n    c.settimeout(2)\n    try:\n        c.recv(65536)\n        \
        c.sendall(b'{\"ok\":true,\"message\":\"forged\"}\\n')\n    except Exception:\n        pass\n    c.close()\n";
    let mut cmd = Command::new(AS_NOBODY[0]);
    cmd.args(&AS_NOBODY[1..])
        .args(["/usr/bin/python3", "-c", forger, sock]);
    let _forger = Reaped::spawn(cmd);
    let deadline = std::time::Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the forger never bound"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for cmd in ["stop", "status", "reload"] {
        let (code, out, err) = lb_cli(&[cmd, "--control", sock]);
        assert_eq!(code, Some(1), "{cmd}: {out}{err}");
        assert!(!out.contains("forged"), "{cmd}: {out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(sock) && err.contains("uid 65534"),
            "{cmd}: {err}"
        );
    }
    // A master does not take the path for another lb master's either.
    let (status, log) = run_to_exit(&["--workers", "1", "--control", sock], &[]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("uid 65534"), "{log}");
    assert!(!log.contains("another lb master"), "{log}");
}

#[test]
fn a_socket_the_client_may_not_open_is_a_permission_problem() {
    if !can_be_nobody("the control socket permission test") {
        return;
    }
    let dir = scratch("eacces");
    let sock = dir.join("lb.sock");
    let sock = sock.to_str().unwrap();
    let _lb = Lb::start(&["--workers", "1", "--control", sock], &[], 1);
    let (code, _, err) = lb_as_nobody(&["status", "--control", sock]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("no lb master answers"), "{err}");
}

#[test]
fn a_non_root_master_makes_a_private_directory_for_its_socket() {
    use std::os::unix::fs::MetadataExt;
    if !can_be_nobody("the default control directory test") {
        return;
    }
    let private = std::path::Path::new("/tmp/lb-65534");
    let _ = std::fs::remove_dir_all(private);
    let mut cmd = lb_command_through(
        &AS_NOBODY,
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[],
    );
    cmd.env_remove("XDG_RUNTIME_DIR");
    let mut lb = Lb::start_command(cmd, 1);
    let meta = std::fs::symlink_metadata(private).expect("the directory is made");
    assert!(meta.is_dir());
    assert_eq!(meta.uid(), NOBODY);
    assert_eq!(meta.mode() & 0o777, 0o700);
    let port = lb.addr.port().to_string();
    let sock = private.join(format!("lb-{port}.sock"));
    assert!(sock.exists(), "{} is the socket", sock.display());
    // Its own user finds it with no --control.
    let listen = format!("127.0.0.1:{port}");
    let (code, out, err) = lb_as_nobody(&["status", "--listen", &listen]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("listening on {listen}")), "{out}");
    let (code, _, err) = lb_as_nobody(&["stop", "--listen", &listen]);
    assert_eq!(code, Some(0), "{err}");
    lb.wait_exit();
    assert!(!sock.exists(), "the socket is removed");

    // A directory of that name that is not its own is refused, named.
    std::os::unix::fs::chown(private, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = lb_command_through(
        &AS_NOBODY,
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[],
    );
    cmd.env_remove("XDG_RUNTIME_DIR");
    let (code, _, err) = Reaped::spawn(cmd).finish();
    let _ = std::fs::remove_dir_all(private);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("/tmp/lb-65534") && err.contains("--control"),
        "{err}"
    );
}

/// Sends `request` as is on a new connection to `addr` and reads the whole
/// answer, giving up after `limit`.
fn raw_http(addr: &str, request: &[u8], limit: std::time::Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(request)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    Ok(String::from_utf8_lossy(&resp).into_owned())
}

/// How long a scrape may take while idle clients hold the metrics port.
const SCRAPE_PROMPT: std::time::Duration = std::time::Duration::from_secs(1);

#[test]
fn metrics_are_answered_while_idle_clients_hold_the_metrics_port() {
    let lb = Lb::start(&["--workers", "1", "--metrics", "127.0.0.1:0"], &[], 1);
    let addr = lb.metrics_addr();
    let sockaddr: std::net::SocketAddr = addr.parse().unwrap();
    let mut idle = Vec::new();
    // 50 clients that connect and send nothing, then more than the
    // endpoint keeps waiting at once.
    for n in [50, 300] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while idle.len() < n && std::time::Instant::now() < deadline {
            if let Ok(s) =
                std::net::TcpStream::connect_timeout(&sockaddr, std::time::Duration::from_secs(1))
            {
                idle.push(s);
            }
        }
        assert_eq!(idle.len(), n, "connected");
        let start = std::time::Instant::now();
        let answer = raw_http(
            &addr,
            b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n",
            std::time::Duration::from_secs(5),
        );
        let took = start.elapsed();
        let answer = answer.unwrap_or_else(|e| {
            panic!(
                "no scrape within {took:?} with {} idle clients: {e}",
                idle.len()
            )
        });
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("\nlb_workers 1\n"), "{answer}");
        assert!(
            took < SCRAPE_PROMPT,
            "the scrape took {took:?} with {} idle clients",
            idle.len()
        );
    }
    // The first idle client is let go, with a 408, within seconds.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(std::time::Duration::from_secs(4)))
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut first, &mut answer)
        .expect("an idle client is answered and closed, not kept");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    drop(idle);
    // One that sends part of a head is let go at its deadline, however it
    // trickles.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut answer = Vec::new();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        use std::io::{Read, Write};
        let _ = slow.write_all(b"G");
        let mut chunk = [0u8; 512];
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    let took = start.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        took > std::time::Duration::from_millis(1500) && took < std::time::Duration::from_secs(4),
        "let go after {took:?}"
    );
    // What is not a scrape is answered at once, with the reason.
    let limit = std::time::Duration::from_secs(5);
    let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(9000));
    for (request, code) in [
        (
            &b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..],
            "405",
        ),
        (b"hello\r\n\r\n", "400"),
        (b"GET /other HTTP/1.0\r\n\r\n", "404"),
        (long.as_bytes(), "431"),
    ] {
        let answer = raw_http(&addr, request, limit).unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {code} ")),
            "{code}: {answer}"
        );
    }
    // HEAD: the head of the scrape, without its body.
    let answer = raw_http(&addr, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n", limit).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(body.is_empty(), "{answer}");
}
