//! `--dispatch kernel`: shared-mode workers each get a listener of their
//! own, and a BPF program in the kernel picks one per connection with lb's
//! policy. Needs root (or CAP_BPF and CAP_NET_ADMIN): elsewhere the tests
//! say so and skip, and the refusal is what is tested.

use std::time::Duration;

use crate::util::*;

/// Serves `hello from worker <slot> (pid <pid>)` on the inherited listener; a slot
/// named in SLOW answers after 300 ms (its queue builds up).
const SERVER: &str = r#"
import os, signal, socket, time
s = socket.socket(fileno=3)
slot = os.environ["LB_WORKER_ID"]
slow = slot in os.environ.get("SLOW", "").split(",")
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("serving", flush=True)
body = ("hello from worker %s (pid %d)\n" % (slot, os.getpid())).encode()
while True:
    c, _ = s.accept()
    req = b""
    while b"\r\n\r\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            break
        req += chunk
    if slow:
        time.sleep(0.3)
    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    c.close()
"#;

fn pools(dir: &std::path::Path, pools: &[(&str, usize, u32)]) -> String {
    let script = dir.join("server.py");
    std::fs::write(&script, SERVER).unwrap();
    let mut text = String::from("mode = \"shared\"\n");
    for (name, count, weight) in pools {
        text.push_str(&format!(
            "[[pool]]\nname = \"{name}\"\ncommand = \"python3\"\nargs = [\"{}\"]\ncount = \
             {count}\nweight = {weight}\n",
            script.display()
        ));
    }
    write_config(dir, "lb.toml", &text)
}

/// Starts lb with kernel dispatch; `None` (the test skips) where the
/// program cannot be loaded.
fn kernel_lb(config: &str, extra: &[&str], env: &[(&str, &str)], workers: usize) -> Option<Lb> {
    let mut args = vec!["--config", config, "--dispatch", "kernel"];
    args.extend_from_slice(extra);
    let probe = lb::dispatch::kernel::Steering::new(lb::policy::PolicyKind::RoundRobin);
    if let Err(e) = probe {
        eprintln!("skipped: BPF programs cannot be loaded here ({e})");
        return None;
    }
    let lb = Lb::start(&args, env, workers);
    lb.wait_log("] serving", workers);
    lb.wait_log("dispatch kernel:", 1);
    Some(lb)
}

/// `n` requests at once, each on a thread of its own.
fn in_flight(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<std::thread::JoinHandle<std::io::Result<String>>> {
    (0..n)
        .map(|_| std::thread::spawn(move || try_get(addr, "/")))
        .collect()
}

/// How many of `n` new connections each slot answered.
fn counts(lb: &Lb, slots: usize, n: usize) -> Vec<usize> {
    let mut counts = vec![0; slots];
    for _ in 0..n {
        counts[slot_of(&get(lb.addr, "/"))] += 1;
    }
    counts
}

#[test]
fn kernel_dispatch_splits_round_robin_exactly() {
    let dir = scratch("kernel-rr");
    let config = pools(&dir, &[("web", 3, 1)]);
    let Some(lb) = kernel_lb(&config, &[], &[], 3) else {
        return;
    };
    // The kernel's hash (shared mode without it) splits 300 connections
    // unevenly; the program hands them out in turn.
    assert_eq!(counts(&lb, 3, 300), [100, 100, 100]);
    // Status says who picks.
    let json = lb.ctl(&["status", "--json"]);
    assert!(json.contains("\"dispatch\": \"kernel\""), "{json}");
    assert!(lb.ctl(&["status"]).contains("(kernel dispatch)"));
}

#[test]
fn kernel_dispatch_weighs_pools() {
    let dir = scratch("kernel-wrr");
    let config = pools(&dir, &[("web", 1, 1), ("canary", 1, 3)]);
    let Some(lb) = kernel_lb(&config, &["--policy", "wrr"], &[], 2) else {
        return;
    };
    assert_eq!(counts(&lb, 2, 400), [100, 300]);
}

/// A worker killed with connections waiting in its listener's queue: they
/// move to the other worker (select-or-migrate) instead of being reset;
/// only what the killed worker had accepted is lost.
#[test]
fn a_killed_workers_queued_connections_move_to_the_others() {
    let dir = scratch("kernel-kill");
    let config = pools(&dir, &[("web", 2, 1)]);
    let Some(lb) = kernel_lb(&config, &[], &[("SLOW", "0")], 2) else {
        return;
    };
    let victim = lb.pid_of_slot(0);
    // 20 at once: 10 queue up behind slot 0's 300 ms answers.
    let clients = in_flight(lb.addr, 20);
    std::thread::sleep(Duration::from_millis(450));
    send_signal(victim, libc::SIGKILL);
    let mut failed = 0;
    let mut moved = 0;
    for c in clients {
        match c.join().unwrap() {
            Ok(body) if slot_of(&body) == 1 => moved += 1,
            Ok(_) => {}
            Err(_) => failed += 1,
        }
    }
    // Slot 0 answered one or two before the kill and had one accepted;
    // the rest of its ten were queued, and are served by slot 1 (which
    // had ten of its own).
    assert!(failed <= 1, "{failed} requests failed");
    assert!(moved >= 10 + 6, "only {moved} answered by slot 1");
    lb.wait_log(&format!("pid {victim}"), 2);
    // The ones that moved are counted and said.
    let said = format!("pid {victim}: rescued ");
    let log = lb.wait_log(&said, 1).join("\n");
    let rescued: u64 = log[log.find(&said).unwrap() + said.len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!((6..=10).contains(&rescued), "rescued {rescued}: {log}");
}

/// lb's protocol under kernel dispatch, from `docs/protocol.md` alone: the
/// LISTENER first, READY with OWN_LISTENER, ACCEPTED and CLOSED reports.
/// A slot named in SLOW holds each connection 300 ms.
const NATIVE: &str = r#"
import os, select, socket, struct, time
H = struct.Struct("<BBxxxxxxQ")
chan = socket.socket(fileno=3)
slot = os.environ["LB_WORKER_ID"]
slow = slot in os.environ.get("SLOW", "").split(",")
reports = os.environ.get("LB_REPORT_CLOSED") == "1"
assert os.environ.get("LB_OWN_LISTENER") == "1"
msg, fds, _, _ = socket.recv_fds(chan, 4096, 4)
assert msg[1] == 3 and len(fds) == 1, (msg, fds)
lis = socket.socket(fileno=fds[0])
chan.send(H.pack(1, 16, 1))
print("serving", flush=True)
body = ("hello from worker %s (pid %d)\n" % (slot, os.getpid())).encode()
while True:
    ready, _, _ = select.select([lis, chan], [], [])
    if chan in ready:
        m = chan.recv(4096)
        if not m or m[1] == 2:
            os._exit(0)
    if lis in ready:
        c, _ = lis.accept()
        if reports:
            chan.send(H.pack(1, 20, 1))
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                break
            req += chunk
        if slow:
            time.sleep(0.3)
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        c.close()
        if reports:
            chan.send(H.pack(1, 17, 1))
"#;

/// Least-connections in the kernel: a worker that holds its connections
/// (slot 1, 300 ms each) is given few, as the master's own least-conn
/// would; round-robin would give it half.
#[test]
fn kernel_least_conn_steers_around_a_slow_worker() {
    let Some(lb) = native_lb("kernel-lc", "lc", &[("SLOW", "1")]) else {
        return;
    };
    // 4 clients, 15 requests each, one at a time.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = lb.addr;
            std::thread::spawn(move || {
                (0..15)
                    .map(|_| try_get(addr, "/").map(|b| slot_of(&b)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut per_slot = [0; 2];
    let mut failed = 0;
    for c in clients {
        for r in c.join().unwrap() {
            match r {
                Ok(slot) => per_slot[slot] += 1,
                Err(_) => failed += 1,
            }
        }
    }
    eprintln!("least-conn split: {per_slot:?}");
    assert_eq!(failed, 0, "{per_slot:?}");
    assert!(
        per_slot[1] <= 20,
        "the slow worker got {per_slot:?} (rr gives it half)"
    );
}

/// Starts two NATIVE workers under kernel dispatch with `policy`.
fn native_lb(name: &str, policy: &str, env: &[(&str, &str)]) -> Option<Lb> {
    let dir = scratch(name);
    let script = dir.join("native.py");
    std::fs::write(&script, NATIVE).unwrap();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"web\"\ncommand = \"python3\"\nargs = [\"{}\"]\ncount = 2\n",
            script.display()
        ),
    );
    kernel_lb(&config, &["--policy", policy], env, 2)
}

/// A worker that stops accepting (SIGSTOP) says nothing, but its accept
/// queue grows: least-connections sees it and sends the rest elsewhere.
/// What was queued for it is served once it runs again.
#[test]
fn kernel_least_conn_steers_around_a_worker_that_stopped_accepting() {
    let Some(lb) = native_lb("kernel-lc-stuck", "lc", &[]) else {
        return;
    };
    let stuck = lb.pid_of_slot(1);
    send_signal(stuck, libc::SIGSTOP);
    let clients: Vec<_> = (0..40)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(25));
            let addr = lb.addr;
            std::thread::spawn(move || try_get(addr, "/").map(|b| slot_of(&b)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    send_signal(stuck, libc::SIGCONT);
    let mut per_slot = [0; 2];
    for c in clients {
        per_slot[c.join().unwrap().expect("every request is answered")] += 1;
    }
    eprintln!("split with slot 1 stopped: {per_slot:?}");
    assert!(per_slot[1] <= 4, "the stopped worker got {per_slot:?}");
}

/// A worker that stops accepting under kernel round-robin (which has no
/// reports to go by): its queue only grows, so after `stall_timeout` it is
/// stalled, what was queued for it moves to the other worker, and it is
/// replaced. Nothing is lost and nothing waits for it.
#[test]
fn kernel_dispatch_stalls_a_worker_that_stopped_accepting() {
    let dir = scratch("kernel-stall");
    let script = dir.join("native.py");
    std::fs::write(&script, NATIVE).unwrap();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "stall_timeout = \"1s\"\n[[pool]]\nname = \"web\"\ncommand = \"python3\"\nargs = [\"{}\"]\ncount = 2\n",
            script.display()
        ),
    );
    let Some(lb) = kernel_lb(&config, &[], &[], 2) else {
        return;
    };
    let stuck = lb.pid_of_slot(1);
    send_signal(stuck, libc::SIGSTOP);
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let addr = lb.addr;
            std::thread::spawn(move || try_get(addr, "/").map(|b| slot_of(&b)))
        })
        .collect();
    let mut per_slot = [0; 2];
    for c in clients {
        per_slot[c.join().unwrap().expect("every request is answered")] += 1;
    }
    let waited = started.elapsed();
    eprintln!("split with slot 1 stopped: {per_slot:?}, all answered in {waited:?}");
    assert_eq!(per_slot[1], 0, "the stopped worker answered {per_slot:?}");
    assert!(
        waited < Duration::from_secs(5),
        "queued connections waited {waited:?}"
    );
    let log = lb
        .wait_log("accepted none of the connections queued", 1)
        .join("\n");
    assert!(log.contains(&format!("pid {stuck}")), "{log}");
    send_signal(stuck, libc::SIGCONT);
    // Replaced: a new process serves slot 1.
    lb.wait_log("] serving", 3);
}

/// The only worker dies with connections queued for it: nobody else is in
/// the schedule, so lb keeps its listener (and the queue) until the
/// replacement is ready, then lets go of it and the kernel moves the queue
/// there. None is reset.
#[test]
fn a_lone_workers_queue_waits_for_its_replacement() {
    let dir = scratch("kernel-lone");
    let config = pools(&dir, &[("web", 1, 1)]);
    let Some(lb) = kernel_lb(&config, &[], &[("SLOW", "0")], 1) else {
        return;
    };
    let victim = lb.pid_of_slot(0);
    let clients = in_flight(lb.addr, 6);
    std::thread::sleep(Duration::from_millis(450));
    send_signal(victim, libc::SIGKILL);
    let answered = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .filter(|r| r.is_ok())
        .count();
    // One or two answered before the kill, one lost inside it; the queued
    // rest served by the replacement.
    assert!(answered >= 4, "only {answered} of 6 answered");
    lb.wait_log("rescued", 1);
}

/// lb stops with connections queued in the workers' own listeners: no new
/// one is steered, and DRAIN waits until the workers took what was queued
/// (nobody else would), so every queued request is answered.
#[test]
fn a_stop_under_kernel_dispatch_serves_what_is_queued() {
    let Some(mut lb) = native_lb("kernel-stop", "rr", &[("SLOW", "0,1")]) else {
        return;
    };
    let clients = in_flight(lb.addr, 8);
    std::thread::sleep(Duration::from_millis(200));
    lb.signal(libc::SIGTERM);
    let answered = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(answered, 8, "queued requests were lost at stop");
    lb.wait_exit();
}

/// After a rolling reload every new connection goes to the new workers
/// (the old ones' listeners are out of the schedule), and none fails.
#[test]
fn kernel_dispatch_follows_a_reload() {
    let dir = scratch("kernel-reload");
    let config = pools(&dir, &[("web", 2, 1)]);
    let Some(lb) = kernel_lb(&config, &[], &[], 2) else {
        return;
    };
    lb.reload(2, 2);
    lb.wait_log("] serving", 4);
    let after = [lb.pid_of_slot(0), lb.pid_of_slot(1)];
    for _ in 0..40 {
        let body = get(lb.addr, "/");
        assert!(
            after.contains(&pid_of(&body)),
            "an old worker answered: {body}"
        );
    }
}

#[test]
fn kernel_dispatch_is_refused_where_it_cannot_work() {
    let dir = scratch("kernel-refused");
    let (status, log) = run_to_exit(
        &[
            "--dispatch",
            "kernel",
            "--mode",
            "proxy",
            "--",
            "python3",
            "-c",
            "pass",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("--dispatch kernel: pool") && log.contains("is mode proxy"),
        "{log}"
    );
    let config = pools(&dir, &[("web", 1, 1)]);
    let (status, log) = run_to_exit(
        &[
            "--config",
            &config,
            "--dispatch",
            "kernel",
            "--policy",
            "lc",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("shared-mode workers do not report"), "{log}");
    let (status, log) = run_to_exit(&["--dispatch", "fastest"], &[]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("use master, kernel or auto"), "{log}");
}

#[test]
fn dispatch_auto_says_when_the_master_picks() {
    let dir = scratch("kernel-auto");
    let config = pools(&dir, &[("web", 1, 1)]);
    let lb = Lb::start(
        &["--config", &config, "--dispatch", "auto", "--policy", "lc"],
        &[],
        1,
    );
    lb.wait_log("dispatch auto: the master picks (policy least-conn", 1);
    assert_eq!(slot_of(&get(lb.addr, "/")), 0);
}

/// Slots added by `lb scale` (beyond the count at start) and a rolling
/// restart of them all: the program follows, no connection is refused.
#[test]
fn kernel_dispatch_follows_a_scale_up_and_a_restart() {
    let dir = scratch("kernel-scale");
    let config = pools(&dir, &[("web", 2, 1)]);
    let Some(lb) = kernel_lb(&config, &[], &[], 2) else {
        return;
    };
    let out = lb.ctl(&["scale", "+2"]);
    assert!(out.contains("4"), "{out}");
    lb.wait_log("] serving", 4);
    lb.wait_ready(4);
    assert_eq!(counts(&lb, 4, 400), [100, 100, 100, 100]);
    let out = lb.ctl(&["restart", "all", "--wait"]);
    assert!(!out.contains("error"), "{out}");
    lb.wait_log("] serving", 8);
    let now: Vec<u32> = (0..4).map(|s| lb.pid_of_slot(s)).collect();
    for _ in 0..40 {
        let body = try_get(lb.addr, "/").expect("refused after the restart");
        assert!(
            now.contains(&pid_of(&body)),
            "an old worker answered: {body}"
        );
    }
}

/// Where BPF programs cannot be loaded (said): the Node tests skip.
fn no_bpf() -> bool {
    let missing = lb::dispatch::kernel::Steering::new(lb::policy::PolicyKind::RoundRobin).is_err();
    if missing {
        eprintln!("skipped: BPF programs cannot be loaded here");
    }
    missing
}

/// Two workers of the Node test app under kernel dispatch with `policy`.
fn node_kernel_lb(node: &str, policy: &str) -> Lb {
    let app = node_app();
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--dispatch",
            "kernel",
            "--policy",
            policy,
            "--",
            node,
            &app,
        ],
        &[],
        2,
    );
    lb.wait_log("dispatch kernel:", 1);
    lb
}

/// Unmodified Node.js cluster workers under kernel dispatch: lb answers
/// each worker's `listen()` with a listener of its own (Node's
/// `SCHED_NONE`), the app accepts by itself, and the program splits new
/// connections exactly; lb sends no `newconn`.
#[test]
fn node_workers_accept_by_themselves_under_kernel_dispatch() {
    if no_bpf() {
        return;
    }
    for (node, version) in node_binaries() {
        eprintln!("== Node {version} ({node})");
        let lb = node_kernel_lb(&node, "rr");
        assert_eq!(split(lb.addr, 2, 200), [100, 100]);
        let json = lb.ctl(&["status", "--json"]);
        // No connection went through lb.
        assert!(json.contains("\"dispatched\": 0"), "{json}");
        // A worker's death moves nothing it had not accepted: the other
        // serves every new connection while the slot restarts.
        let victim = lb.pid_of_slot(0);
        send_signal(victim, libc::SIGKILL);
        lb.wait_log(&format!("pid {victim}"), 2);
        for _ in 0..20 {
            assert!(
                try_get(lb.addr, "/").is_ok(),
                "a request failed after the kill"
            );
        }
        // A rolling reload: the new workers get their own listeners and
        // every request is answered.
        lb.reload(2, 2);
        for _ in 0..40 {
            assert!(
                try_get(lb.addr, "/").is_ok(),
                "a request failed after the reload"
            );
        }
    }
}

/// Least-connections under kernel dispatch for unmodified Node apps: the
/// close-report preload also counts the worker's own accepts, so lb knows
/// what each holds though it handed out nothing.
#[test]
fn node_least_conn_under_kernel_dispatch_counts_each_workers_connections() {
    if no_bpf() {
        return;
    }
    for (node, version) in node_binaries() {
        eprintln!("== Node {version} ({node})");
        let lb = node_kernel_lb(&node, "lc");
        let per = split(lb.addr, 2, 100);
        assert_eq!(per.iter().sum::<usize>(), 100);
        // Every accept and close reported: 100 in all, none open.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let json = lb.ctl(&["status", "--json"]);
            let totals: u64 = json
                .match_indices("\"total\": ")
                .map(|(i, m)| {
                    json[i + m.len()..]
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                })
                .sum();
            if totals == 100 && json.matches("\"active\": 0").count() == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reports never added up to 100 accepted, 0 open: {json}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
