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
