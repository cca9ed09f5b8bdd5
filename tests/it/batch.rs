//! Several connections to a CONN (`ready::BATCH`, `docs/protocol.md` §2):
//! a burst reaches batching workers a few CONNs at a time, beside a worker
//! older than the flag that still gets one fd to a CONN, and what a killed
//! batching worker left in its channel is read back, every fd of every CONN.

use std::time::{Duration, Instant};

use crate::util::*;

/// A Python worker that says READY with `flags`, prints how many fds each
/// CONN brought (and the count its header says), and serves them all.
fn counting_worker(dir: &std::path::Path, name: &str, flags: u64) -> String {
    python_worker(
        dir,
        name,
        &format!(
            "send(16, {flags})\n\
             while True:\n    \
                 msg, fds, _, _ = socket.recv_fds(chan, 4096, 8)\n    \
                 if not msg or msg[1] == 2:\n        break\n    \
                 if msg[1] == 1:\n        \
                     print('{name} got %d fds, count %d' % (len(fds), max(msg[2], 1)), flush=True)\n        \
                     for fd in fds:\n            serve_one(fd)\n"
        ),
    )
}

/// A `[[pool]]` of `examples/hello.c`.
fn c_pool(name: &str) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"{}\"\ncount = 1\n",
        c_worker()
    )
}

/// Opens `n` requests while the master is stopped (SIGSTOP), so that the
/// kernel's backlog holds them all and the master, continued, accepts them
/// in full batches: the worker each batch picks several times gets them
/// in one CONN if it batches.
fn burst(lb: &Lb, n: usize) -> Vec<std::net::TcpStream> {
    lb.signal(libc::SIGSTOP);
    let streams = (0..n).map(|_| send_request(lb.addr)).collect();
    lb.signal(libc::SIGCONT);
    streams
}

/// The counts in "<name> got N fds, count C" lines: (N, C) each.
fn got(lb: &Lb, name: &str) -> Vec<(usize, usize)> {
    let needle = format!("{name} got ");
    lb.log
        .lines()
        .iter()
        .filter_map(|l| {
            let rest = l.split(&needle).nth(1)?;
            let mut words = rest.split([' ', ',']).filter(|w| !w.is_empty());
            let n = words.next()?.parse().ok()?;
            let c = words.nth(2)?.parse().ok()?;
            Some((n, c))
        })
        .collect()
}

#[test]
fn a_burst_reaches_batching_workers_several_to_a_conn_and_old_ones_one() {
    let dir = scratch("batch-burst");
    let old = counting_worker(&dir, "old.py", 0);
    let batching = counting_worker(&dir, "batching.py", 4);
    let hello_py = repo().join("examples/hello.py");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "policy = \"rr\"\n{}{}{}{}{}",
            python_pool("old", &old, 1),
            python_pool("batching", &batching, 1),
            c_pool("hello-c"),
            hello_pool("bundled", 1),
            python_pool("hello-py", hello_py.to_str().unwrap(), 1),
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 5);
    let n = 80;
    let bodies: Vec<String> = burst(&lb, n)
        .into_iter()
        .map(|s| read_body(s).expect("every connection of the burst is served"))
        .collect();
    let mut per_slot = [0usize; 5];
    for b in &bodies {
        per_slot[slot_of(b)] += 1;
    }
    eprintln!("a burst of {n}: served per slot {per_slot:?}");
    assert!(per_slot.iter().all(|&k| k > 0), "{per_slot:?}");
    // Their lines reach lb's log on their own time.
    let deadline = Instant::now() + WAIT;
    while got(&lb, "old.py").len() < per_slot[0]
        || got(&lb, "batching.py").iter().map(|g| g.0).sum::<usize>() < per_slot[1]
    {
        assert!(Instant::now() < deadline, "the workers' lines never came");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The old worker: one fd to a CONN, always.
    let old_got = got(&lb, "old.py");
    assert_eq!(old_got.len(), per_slot[0], "{old_got:?}");
    assert!(old_got.iter().all(|&g| g == (1, 1)), "{old_got:?}");
    // The batching one: what its header says, several at a time.
    let batched = got(&lb, "batching.py");
    assert_eq!(
        batched.iter().map(|g| g.0).sum::<usize>(),
        per_slot[1],
        "{batched:?}"
    );
    assert!(
        batched.iter().all(|&(n, c)| n == c && n <= 8),
        "{batched:?}"
    );
    assert!(
        batched.iter().any(|&(n, _)| n > 1),
        "never batched: {batched:?}"
    );
    // Status (and /metrics) count the messages: fewer than connections.
    let status = lb.status();
    let dispatched = status["dispatched"].as_u64().unwrap();
    let messages = status["conn_messages"].as_u64().unwrap();
    assert_eq!(dispatched, n as u64, "{status}");
    assert!(messages < dispatched, "{status}");
}

/// A batching worker that never reads is sent CONNs of several fds (the
/// burst is accepted 16 at a time, half of each batch for it), then killed
/// with -9: every fd of every CONN is read back and served by the other.
#[test]
fn multi_fd_conns_queued_for_a_killed_batching_worker_are_rescued() {
    let (lb, stuck_pid) = stuck_beside_hello("batch-rescue", 4);
    let bodies: Vec<String> = kill_once_answered(burst(&lb, 40), 20, stuck_pid)
        .into_iter()
        .map(|b| b.expect("no connection lost"))
        .collect();
    assert!(
        bodies.iter().all(|b| slot_of(b) == 1),
        "all served by the live worker"
    );
    lb.wait_log("rescued", 1);
    assert_eq!(
        lb.rescued(),
        20,
        "every fd of every queued CONN was read back"
    );
}

/// A batching worker that takes a few CONNs and then stops reading: its
/// channel fills with CONNs of several fds, the stall watch (which counts
/// a channel's unread bytes in messages) sees it take none, and what
/// waits for it goes to the other worker: no request fails.
#[test]
fn a_batching_worker_that_stops_reading_costs_no_request() {
    use crate::util::load::{Load, Style};
    let dir = scratch("batch-stuck");
    let stuck = python_worker(
        &dir,
        "stuck.py",
        "send(16, 4)\nfor _ in range(3):\n    msg, fds, _, _ = socket.recv_fds(chan, 4096, 8)\n    \
         for fd in fds:\n        serve_one(fd)\nwhile True:\n    time.sleep(1)",
    );
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "worker_queue = 8\nstall_timeout = \"2s\"\n{}{}",
            python_pool("stuck", &stuck, 1),
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 2);
    let load = Load::start(lb.addr, 10, Style::Close, None);
    lb.wait_log("took none of its", 1);
    lb.wait_log("replacing it, its successor ready first", 1);
    load.wait_more(500);
    let tally = load.stop();
    eprintln!("a stuck batching worker: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
}
