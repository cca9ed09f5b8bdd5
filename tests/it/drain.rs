//! Draining that clients do not notice: rolling reloads, scaling down and
//! recycling under keep-alive load fail no request, for the bundled worker
//! and the C and Python examples (`docs/protocol.md` §4), counted by a
//! client that calls a reset or an EOF before a response a failure, and by
//! wrk.

use std::process::Command;
use std::time::Duration;

use crate::util::load::{Load, Style, Tally, reloads_under_load};
use crate::util::*;

fn assert_no_failure(what: &str, tally: Tally) {
    eprintln!("{what}: {tally:?}");
    assert_eq!(tally.failed, 0, "{what}: {:?}", tally.first);
    assert!(tally.ok > 500, "{what}: the load kept flowing: {tally:?}");
}

#[test]
fn keep_alive_clients_notice_no_reload_scale_down_or_recycling() {
    let dir = scratch("drain-keepalive");
    // Recycled past 40 connections: the keep-alive clients alone never get
    // there; a burst of short requests below does.
    let config = write_config(
        &dir,
        "lb.toml",
        &format!("max_conns_per_worker = 40\n{}", hello_pool("hello", 3)),
    );
    let lb = Lb::start(&["--config", &config], &[], 3);
    let load = Load::start(lb.addr, 20, Style::KeepAlive, None);
    load.wait_more(500);
    lb.reload(3, 2);
    load.wait_more(500);
    lb.reload(3, 3);
    load.wait_more(500);
    // Scale down: slot 2's worker drains with clients on it.
    let out = lb.ctl(&["scale", "2"]);
    assert!(out.contains("scaled from 3 to 2 workers"), "{out}");
    lb.wait_log("worker 2 pid ", 1);
    lb.wait_log("gen 3: exit (exit code 0", 1);
    load.wait_more(500);
    // Recycling: 120 new connections take both slots over the limit.
    for _ in 0..120 {
        get(lb.addr, "/");
    }
    lb.wait_log("connections (limit 40); replacing it", 2);
    lb.wait_log("gen 3: exit (exit code 0", 3);
    load.wait_more(500);
    assert_no_failure("2 reloads, a scale-down and 2 recycles", load.stop());
}

#[test]
fn keep_alive_clients_notice_no_reload_of_the_c_and_python_examples() {
    let dir = scratch("drain-examples");
    let python = repo().join("examples/hello.py");
    let python = python.to_str().unwrap().to_string();
    let c = c_worker();
    for command in [vec![c.as_str()], vec!["python3", python.as_str()]] {
        let mut args = vec!["--workers", "2", "--"];
        args.extend(&command);
        let lb = Lb::start(&args, &[], 2);
        let tally = reloads_under_load(&lb, 20, Style::KeepAlive, 2, 2..=3);
        assert_no_failure(&format!("2 reloads of {command:?}"), tally);
    }
    drop(dir);
}

/// wrk, a client nobody here wrote, counts a read error for every
/// connection closed under it.
#[test]
fn wrk_sees_no_error_across_two_reloads() {
    if !installed("wrk", "the wrk reload test") {
        return;
    }
    let lb = Lb::start(&["--workers", "2"], &[], 2);
    let url = format!("http://{}/", lb.addr);
    let mut wrk = Command::new("wrk")
        .args(["-t1", "-c20", "-d6s", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run wrk");
    std::thread::sleep(Duration::from_millis(1500));
    lb.reload(2, 2);
    std::thread::sleep(Duration::from_millis(1500));
    lb.reload(2, 3);
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = wrk.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = wrk.kill();
            let _ = wrk.wait();
            panic!("wrk did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut wrk.stdout.take().unwrap(), &mut out).unwrap();
    eprintln!("{out}");
    assert!(status.success(), "{out}");
    assert!(out.contains("requests in"), "{out}");
    assert!(!out.contains("Socket errors"), "{out}");
    assert!(!out.contains("Non-2xx"), "{out}");
}

/// A client stalled in the middle of a request (or not reading its
/// response) does not hold a drain up until the kill: the worker closes a
/// connection that makes no progress for the idle grace, and exits.
#[test]
fn a_stalled_client_does_not_hold_a_drain_until_the_kill() {
    use std::io::Write;
    let mut lb = Lb::start(&["--workers", "1", "--drain-timeout", "8s"], &[], 1);
    let mut stalled = std::net::TcpStream::connect(lb.addr).unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success(), "drained, not killed");
    // The grace is 2 s; the kill would come at 8 s.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}
