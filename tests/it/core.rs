//! The core: every connection served, policies, configuration, the
//! example workers, back-pressure, errors on bad input.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

#[test]
fn every_connection_is_served_and_round_robin_is_exact() {
    let lb = Lb::start(&["--workers", "4", "--policy", "rr"], &[], 4);
    assert_eq!(split(lb.addr, 4, 4 * 50), [50, 50, 50, 50]);
}

#[test]
fn concurrent_clients_all_get_answers_from_every_worker() {
    let lb = Lb::start(&["--workers", "3"], &[], 3);
    let addr = lb.addr;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| slot_of(&get(addr, "/")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut count = [0usize; 3];
    for t in threads {
        for slot in t.join().unwrap() {
            count[slot] += 1;
        }
    }
    assert_eq!(count.iter().sum::<usize>(), 800);
    // Concurrent arrivals interleave, but round-robin over accepts stays exact.
    let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
    assert!(max - min <= 1, "round-robin over 800 accepts: {count:?}");
}

#[test]
fn keep_alive_requests_stay_on_their_worker() {
    let lb = Lb::start(&["--workers", "2"], &[], 2);
    let mut conn = KeepAlive::open(lb.addr);
    let first = conn.get("/");
    for _ in 0..5 {
        assert_eq!(
            conn.get("/"),
            first,
            "a kept-alive connection belongs to one worker"
        );
    }
}

#[test]
fn weighted_split_follows_pool_weights() {
    let dir = scratch("wrr");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "policy = \"wrr\"\n{}weight = 3\n{}weight = 1\n",
            hello_pool("main", 3),
            hello_pool("canary", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 4);
    // Smooth WRR is exact over every cycle of 3+3+3+1 = 10 picks.
    assert_eq!(split(lb.addr, 4, 100), [30, 30, 30, 10]);
}

#[test]
fn least_conn_steers_new_connections_away_from_long_lived_ones() {
    let lb = Lb::start(&["--workers", "2", "--policy", "lc"], &[], 2);
    // Short connections go to worker 1 once its four are released: it has
    // 0 active (at most 1 while a close report is in flight), worker 0 has
    // 4. Round-robin would send half of them to worker 0.
    let count = split_after_worker_0_holds_four(lb.addr);
    assert!(
        count[1] >= 38,
        "least-conn should avoid the busy worker: {count:?}"
    );
}

#[test]
fn round_robin_ignores_long_lived_connections() {
    // The control for the test above: the same load under rr splits evenly.
    let lb = Lb::start(&["--workers", "2", "--policy", "rr"], &[], 2);
    let _held: Vec<KeepAlive> = (0..4)
        .map(|_| {
            let mut c = KeepAlive::open(lb.addr);
            c.get("/");
            c
        })
        .collect();
    assert_eq!(split(lb.addr, 2, 40), [20, 20]);
}

#[test]
fn sched_policy_env_takes_effect_and_the_flag_wins() {
    let dir = scratch("env");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "{}weight = 3\n{}weight = 1\n",
            hello_pool("a", 1),
            hello_pool("b", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[("SCHED_POLICY", "WRR")], 2);
    assert!(lb.log.count("policy weighted") == 1);
    assert_eq!(split(lb.addr, 2, 40), [30, 10]);
    drop(lb);

    let lb = Lb::start(
        &["--config", &config, "--policy", "rr"],
        &[("SCHED_POLICY", "wrr")],
        2,
    );
    assert!(lb.log.count("policy round-robin") == 1);
    assert_eq!(split(lb.addr, 2, 40), [20, 20]);
}

#[test]
fn python_example_worker_serves_behind_lb() {
    let script = repo().join("examples/hello.py");
    let lb = Lb::start(
        &["--workers", "2", "--", "python3", script.to_str().unwrap()],
        &[],
        2,
    );
    assert_eq!(split(lb.addr, 2, 20), [10, 10]);
}

#[test]
fn c_example_worker_serves_behind_lb() {
    let bin = c_worker();
    let lb = Lb::start(&["--workers", "2", "--", &bin], &[], 2);
    assert_eq!(split(lb.addr, 2, 20), [10, 10]);
    let mut conn = KeepAlive::open(lb.addr);
    let first = conn.get("/");
    assert_eq!(conn.get("/"), first);
}

#[test]
fn no_connection_goes_to_a_worker_before_its_ready() {
    // Pool "silent" inherits its channel but never says READY.
    let dir = scratch("notready");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"silent\"\ncommand = \"sleep\"\nargs = [\"60\"]\ncount = 1\n{}",
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 1);
    let count = split(lb.addr, 2, 30);
    assert_eq!(count, [0, 30]);
}

/// A worker that says READY but reads nothing for a while: its channel
/// fills, the master skips it, and every connection is still answered.
#[test]
fn a_slow_worker_costs_no_connection() {
    let dir = scratch("slow");
    let slow = python_worker(&dir, "slow.py", "send(16)\ntime.sleep(3)\nserve_forever()");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "{}{}",
            python_pool("slow", &slow, 1),
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config, "--policy", "rr"], &[], 2);
    // Far more connections than one channel holds, all opened before any
    // answer is read.
    let n = 1500;
    let conns: Vec<TcpStream> = (0..n).map(|_| send_request(lb.addr)).collect();
    let mut count = [0usize; 2];
    for s in conns {
        count[slot_of(&read_body(s).unwrap())] += 1;
    }
    assert_eq!(count[0] + count[1], n);
    assert!(count[0] < n / 2, "the full worker was skipped: {count:?}");
    assert!(
        count[0] > 0,
        "the slow worker still served what it was sent: {count:?}"
    );
}

#[test]
fn workers_get_their_environment_and_distinct_slots() {
    let lb = Lb::start(&["--workers", "3"], &[], 3);
    let bodies: Vec<String> = (0..3).map(|_| get(lb.addr, "/")).collect();
    let slots: HashSet<usize> = bodies.iter().map(|b| slot_of(b)).collect();
    let pids: HashSet<u32> = bodies.iter().map(|b| pid_of(b)).collect();
    assert_eq!(slots, HashSet::from([0, 1, 2]));
    assert_eq!(pids.len(), 3);
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: BTreeMap<String, String> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                std::str::from_utf8(kv)
                    .ok()?
                    .split_once('=')
                    .map(|(k, v)| (k.into(), v.into()))
            })
            .collect();
        assert_eq!(vars["LB_FD"], "3");
        assert_eq!(vars["LB_PROTOCOL"], "1");
        assert_eq!(vars["LB_GENERATION"], "1");
        assert_eq!(
            vars["LB_REPORT_CLOSED"], "0",
            "round-robin reads no close reports"
        );
        // Their own process group: a terminal's ^C reaches only the master.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let pgrp: u32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(pgrp, pid);
    }
}

#[test]
fn bad_input_gets_one_line_and_exit_code_2() {
    let (status, log) = run_to_exit(&["--policy", "fastest"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(log.contains("--policy") && log.contains("fastest"), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");

    let (status, log) = run_to_exit(&["--", "/no/such/worker"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        log.contains("/no/such/worker") && log.contains("does not exist"),
        "{log}"
    );

    let dir = scratch("badkey");
    let config = write_config(&dir, "lb.toml", "listen = \"127.0.0.1:0\"\nworkerz = 2\n");
    let (status, log) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        log.contains("lb.toml:2") && log.contains("workerz"),
        "{log}"
    );

    let (status, log) = run_to_exit(&[], &[("SCHED_POLICY", "nope")]);
    assert_eq!(status.code(), Some(2));
    assert!(log.contains("SCHED_POLICY"), "{log}");
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) = run_to_exit(&["--listen", &addr, "--workers", "1"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        log.contains("address already in use") && log.contains(&addr),
        "{log}"
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut lb = Lb::start(&["--workers", "2"], &[], 2);
    get(lb.addr, "/");
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", lb.log.lines().join("\n"));
    assert_eq!(lb.log.count("(exit code 0"), 2);
    // The port is free again.
    let gone = TcpStream::connect_timeout(&lb.addr, Duration::from_secs(1));
    assert!(gone.is_err());
}

#[test]
fn slow_request_in_flight_finishes_before_shutdown() {
    let mut lb = Lb::start(&["--workers", "1"], &[], 1);
    // Connected and sent before the signal: the connection is at least in
    // the backlog, which shutdown hands out before it sends DRAIN.
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /sleep/700 HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .unwrap();
    lb.signal(libc::SIGTERM);
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("hello from worker 0"), "{resp:?}");
    assert_eq!(lb.wait_exit().code(), Some(0));
}

/// Pipelined requests on one connection are answered in order. Guards the
/// hello worker's response framing, which the tests above rely on.
#[test]
fn hello_worker_answers_pipelined_requests_in_order() {
    let lb = Lb::start(&["--workers", "1"], &[], 1);
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3);
    assert!(all.contains("Connection: close"));
}
