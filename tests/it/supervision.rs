//! Supervision: workers that crash, hang, leave or misbehave never cost a
//! connection they had not taken; shutdown drains; no orphans.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// A worker that stops reading its channel and then dies: every connection
/// queued in its channel is read back by the master and served by another.
#[test]
fn connections_queued_for_a_dead_worker_are_rescued() {
    let (lb, stuck_pid) = stuck_beside_hello("rescue", 0);

    // Round-robin alternates: once the live worker answered its 20, the
    // stuck one holds the other 20 unread in its channel.
    let requests = (0..40).map(|_| send_request(lb.addr)).collect();
    let bodies: Vec<String> = kill_once_answered(requests, 20, stuck_pid)
        .into_iter()
        .map(|b| b.unwrap())
        .collect();
    assert!(
        bodies.iter().all(|b| slot_of(b) == 1),
        "all served by the live worker"
    );
    lb.wait_log("rescued", 1);
    assert_eq!(lb.rescued(), 20, "every queued connection was read back");
    lb.wait_log("worker 0 gen 1: spawn", 2); // and the slot is restarted
}

/// kill -9 a worker under continuous load: only what it had taken can fail;
/// the slot comes back with a new process.
#[test]
fn kill_9_under_load_costs_only_the_connections_the_worker_held() {
    let lb = Lb::start(&["--workers", "3"], &[], 3);
    let victim = lb.pid_of_slot(1);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (lb.addr, Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut new_pid_seen) = (0u64, 0u64, false);
                while !stop.load(Ordering::Relaxed) {
                    match try_get(addr, "/") {
                        Ok(body) => {
                            ok += 1;
                            new_pid_seen |= slot_of(&body) == 1 && pid_of(&body) != victim;
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed, new_pid_seen)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300)); // load is flowing
    send_signal(victim, libc::SIGKILL);
    lb.wait_log("worker 1 gen 1: spawn", 2);
    lb.wait_log(": ready", 4);
    std::thread::sleep(Duration::from_millis(300)); // load reaches the new worker
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed, mut replaced) = (0, 0, false);
    for c in clients {
        let (o, f, n) = c.join().unwrap();
        ok += o;
        failed += f;
        replaced |= n;
    }
    eprintln!(
        "kill -9 under load: {} requests, {failed} failed, {} rescued",
        ok + failed,
        lb.rescued()
    );
    // Four clients, one request each in flight: the worker held at most 4.
    assert!(failed <= 4, "{failed} failures");
    assert!(ok > 100, "load kept flowing: {ok}");
    assert!(replaced, "the restarted worker 1 served requests");
    assert!(lb.log.count("exit (killed by SIGKILL") == 1);
}

#[test]
fn a_crashing_worker_backs_off_and_the_master_stays_idle() {
    let dir = scratch("crash");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "{}[[pool]]\nname = \"crash\"\ncommand = \"sh\"\nargs = [\"-c\", \"exit 3\"]\ncount = 1\n",
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 1);
    let before = cpu_millis(lb.pid());
    let window = Duration::from_secs(3);
    std::thread::sleep(window); // measuring what happens over a fixed window
    let cpu = cpu_millis(lb.pid()) - before;
    let spawns = lb.log.count("worker 1 gen 1: spawn");
    // Backoff 100, 200, 400, 800, 1600 ms: about 5-6 starts in 3 s, not thousands.
    assert!((3..=8).contains(&spawns), "{spawns} spawns in {window:?}");
    assert_eq!(lb.log.count("is crash-looping"), 1, "reported once");
    assert!(cpu < 300, "master used {cpu} ms of CPU in {window:?}");
    // The healthy worker serves throughout.
    assert_eq!(slot_of(&get(lb.addr, "/")), 0);
}

#[test]
fn when_no_worker_can_start_lb_says_so_and_exits() {
    // Every worker exits at once: after a few backed-off tries, one line.
    let (status, log) = run_to_exit(&["--workers", "2", "--", "sh", "-c", "exit 7"], &[]);
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap();
    assert!(
        last.contains("no worker became ready") && last.contains("exit code 7"),
        "{log}"
    );

    // A script whose interpreter does not exist: exec itself fails.
    let dir = scratch("noexec");
    let bogus = dir.join("bogus");
    std::fs::write(&bogus, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&bogus, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (status, log) = run_to_exit(&["--", bogus.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap();
    assert!(
        last.contains("cannot start worker") && last.contains("#! interpreter"),
        "{log}"
    );
    assert_eq!(log.matches(": spawn").count(), 1, "no restart loop: {log}");
    assert_eq!(log.matches("lb: error:").count(), 1, "one line: {log}");
}

#[test]
fn a_worker_that_never_says_ready_is_killed_and_gets_nothing() {
    let dir = scratch("ready-timeout");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"silent\"\ncommand = \"sleep\"\nargs = [\"60\"]\ncount = 1\n{}",
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config, "--ready-timeout", "300ms"], &[], 1);
    assert_eq!(split(lb.addr, 2, 20), [0, 20]);
    lb.wait_log("worker 0 pid", 1);
    lb.wait_log("not ready within 0.3s; killing it", 1);
    lb.wait_log("exit (killed by SIGKILL", 1);
    lb.wait_log("worker 0 gen 1: spawn", 2); // counted as a failed start, restarted
    assert_eq!(split(lb.addr, 2, 20), [0, 20]);
}

/// Protocol errors are logged (the first 3), counted, and at 10 the worker
/// is replaced successor first: it keeps serving until its successor is
/// ready, then drains. A STOP before DRAIN is one of them, and ignored.
#[test]
fn garbage_on_the_channel_is_logged_and_a_persistent_offender_replaced() {
    let dir = scratch("garbage");
    let garbage = python_worker(
        &dir,
        "garbage.py",
        "send(16)\nsend(19)\nfor i in range(20):\n    chan.send(b'\\x09junk')\nserve_forever()",
    );
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "{}{}",
            python_pool("garbage", &garbage, 1),
            hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 2);
    let old = lb.pid_of_slot(0);
    lb.wait_log("protocol errors; replacing it", 1);
    let first = lb.log.lines();
    let logged = first
        .iter()
        .filter(|l| l.contains("protocol error:"))
        .count();
    assert!(logged >= 3, "the first errors are logged");
    assert!(
        first
            .iter()
            .any(|l| l.contains("shorter than the 16-byte header"))
    );
    assert!(
        first.iter().any(|l| l.contains("STOP before DRAIN")),
        "{first:?}"
    );
    // The master kept serving all along, and the offender is replaced:
    // its successor is ready before it exits, drained (exit code 0).
    for _ in 0..10 {
        get(lb.addr, "/");
    }
    lb.wait_log("worker 0 gen 1: spawn", 2);
    let lines = lb.wait_log(&format!("pid {old} gen 1: exit (exit code 0"), 1);
    let new = lb.pid_of_slot(0);
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
    assert!(
        at(&format!("worker 0 pid {new} gen 1: ready")) < at(&format!("pid {old} gen 1: exit")),
        "{lines:?}"
    );
}

#[test]
fn an_announced_exit_gets_its_replacement_started_first() {
    let dir = scratch("leaving");
    let leaving = python_worker(
        &dir,
        "leaving.py",
        "send(16)\ntime.sleep(0.3)\nsend(18)\ntime.sleep(1.0)\nsys.exit(0)",
    );
    let config = write_config(&dir, "lb.toml", &python_pool("leaving", &leaving, 1));
    let lb = Lb::start(&["--config", &config], &[], 1);
    let old = lb.pid_of_slot(0);
    let lines = lb.wait_log(&format!("pid {old} gen 1: exit"), 1);
    let pos = |needle: &str| lines.iter().position(|l| l.contains(needle));
    let leaving_at = pos(&format!("pid {old}: leaving")).expect("leaving logged");
    let replacement_online = lines
        .iter()
        .enumerate()
        .position(|(i, l)| i > leaving_at && l.contains(": online"))
        .expect("replacement started");
    let exit_at = pos(&format!("pid {old} gen 1: exit")).unwrap();
    assert!(
        replacement_online < exit_at,
        "replacement before exit:\n{}",
        lines.join("\n")
    );
    assert!(lines[exit_at].contains("expected)"));
}

#[test]
fn worker_output_is_prefixed_with_slot_and_pid() {
    let dir = scratch("output");
    let talk = python_worker(
        &dir,
        "talk.py",
        "print('hello on stdout', flush=True)\nprint('oops on stderr', file=sys.stderr, flush=True)\n\
         send(16)\nserve_forever()",
    );
    let lb = Lb::start(&["--workers", "1", "--", "python3", &talk], &[], 1);
    let pid = lb.pid_of_slot(0);
    lb.wait_log(&format!("[worker 0 pid {pid}] hello on stdout"), 1);
    lb.wait_log(&format!("[worker 0 pid {pid} stderr] oops on stderr"), 1);
    drop(lb);

    let file = dir.join("workers.log");
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--worker-log",
            file.to_str().unwrap(),
            "--",
            "python3",
            &talk,
        ],
        &[],
        1,
    );
    let pid = lb.pid_of_slot(0);
    let deadline = Instant::now() + WAIT;
    let want = format!("[worker 0 pid {pid}] hello on stdout");
    while !std::fs::read_to_string(&file)
        .unwrap_or_default()
        .contains(&want)
    {
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        lb.log.count("hello on stdout"),
        0,
        "not on stderr when a file is given"
    );
}

#[test]
fn a_request_slower_than_drain_timeout_is_killed_at_the_deadline() {
    let mut lb = Lb::start(&["--workers", "1", "--drain-timeout", "300ms"], &[], 1);
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /sleep/10000 HTTP/1.1\r\nHost: lb\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(1), "killed workers: not a clean drain");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "stopped at the deadline"
    );
    assert!(lb.log.count("drain timeout (0.3s): killing 1 workers") == 1);
}

#[test]
fn a_second_sigint_or_a_sigquit_stops_at_once() {
    for signals in [&[libc::SIGINT, libc::SIGINT][..], &[libc::SIGQUIT][..]] {
        let mut lb = Lb::start(&["--workers", "1", "--drain-timeout", "30s"], &[], 1);
        let mut s = TcpStream::connect(lb.addr).unwrap();
        s.write_all(b"GET /sleep/10000 HTTP/1.1\r\nHost: lb\r\n\r\n")
            .unwrap();
        let start = Instant::now();
        for &sig in signals {
            lb.signal(sig);
            if signals.len() > 1 {
                lb.wait_log("draining 1 workers", 1);
            }
        }
        assert_eq!(lb.wait_exit().code(), Some(1));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{signals:?} did not stop at once"
        );
    }
}

#[test]
fn killing_the_master_takes_every_worker_with_it() {
    let mut lb = Lb::start(&["--workers", "3"], &[], 3);
    let pids: Vec<u32> = (0..3).map(|s| lb.pid_of_slot(s)).collect();
    assert!(pids.iter().all(|&p| alive(p)));
    lb.signal(libc::SIGKILL);
    lb.wait_exit();
    let deadline = Instant::now() + Duration::from_secs(1);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived the master by 1s: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn workers_over_max_conns_are_recycled_successor_first_without_a_failed_request() {
    let lb = Lb::start(&["--workers", "2", "--max-conns-per-worker", "200"], &[], 2);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    // Each slot passes 200 connections within a second or two: both recycle.
    lb.wait_log("connections (limit 200); replacing it", 2);
    lb.wait_ready(4);
    lb.wait_log("gen 1: exit (exit code 0", 2);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed += f;
    }
    eprintln!("recycling under load: {ok} requests served, {failed} failed");
    assert_eq!(failed, 0);
}

/// A worker that grows past `max_rss` is replaced, successor first.
#[test]
fn a_worker_over_max_rss_is_recycled() {
    let dir = scratch("max-rss");
    // Small when fresh; 96 MB (written, so resident) after 2.5 s.
    let grows = python_worker(
        &dir,
        "grows.py",
        "import threading\nfat = []\n\
         threading.Timer(2.5, lambda: fat.append(b'x' * (96 << 20))).start()\n\
         send(16)\nserve_forever()",
    );
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--max-rss",
            "64MB",
            "--",
            "python3",
            &grows,
        ],
        &[],
        1,
    );
    let old = lb.pid_of_slot(0);
    lb.wait_log(&format!("worker 0 pid {old} uses "), 1);
    lb.wait_log(&format!("pid {old} gen 1: exit (exit code 0"), 1);
    assert_ne!(pid_of(&get(lb.addr, "/")), old);
}

/// A `max_rss` below what a fresh worker uses would replace every worker
/// as soon as it was checked, forever (it did, silently, once a second):
/// lb says so once and does not churn.
#[test]
fn a_max_rss_below_a_fresh_workers_is_said_once_and_does_not_churn() {
    // The hello worker's RSS is a few MB: 1 MB is always exceeded.
    let lb = Lb::start(&["--workers", "1", "--max-rss", "1MB"], &[], 1);
    let old = lb.pid_of_slot(0);
    lb.wait_log("is below what a fresh worker uses", 1);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lb.pid_of_slot(0), old, "no churn");
    assert_eq!(lb.log.count("is below what a fresh worker uses"), 1);
}

/// Whatever lb was started with, a worker starts clean: fds 0-2 and the
/// channel only (not one the launcher leaked to lb without CLOEXEC),
/// default signal dispositions (not the SIG_IGN of `nohup` or a shell's
/// `trap ''`) and an empty signal mask. lb still hears the SIGHUP its
/// launcher ignored.
#[test]
fn workers_inherit_neither_stray_fds_nor_ignored_or_blocked_signals() {
    let dir = scratch("inherit");
    let script = python_worker(
        &dir,
        "inherit.py",
        r#"
import re
status = open("/proc/self/status").read()
mask = lambda name: int(re.search(name + r":\s*([0-9a-f]+)", status).group(1), 16)
fds = []
for name in os.listdir("/proc/self/fd"):
    try:
        fds.append("%s=%s" % (name, os.readlink("/proc/self/fd/" + name)))
    except OSError:
        pass  # the listing's own fd, closed by now
print("inherited ignored=%x blocked=%x fds=%s" % (mask("SigIgn"), mask("SigBlk"), " ".join(sorted(fds))), flush=True)
send(16)
serve_forever()
"#,
    );
    // The launcher ignores HUP, INT and QUIT, blocks USR1 and USR2, leaves
    // an fd open without CLOEXEC, and execs lb.
    let launcher = [
        "python3",
        "-c",
        "import os, signal, sys\n\
         for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT): signal.signal(s, signal.SIG_IGN)\n\
         signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})\n\
         leak = os.open('/dev/null', os.O_RDONLY)\n\
         os.set_inheritable(leak, True)\n\
         os.execv(sys.argv[1], sys.argv[1:])",
    ];
    let control = dir.join("lb.sock");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
        "--workers",
        "1",
        "--",
        "python3",
        &script,
    ];
    let lb = Lb::start_command(lb_command_through(&launcher, &args, &[]), 1);
    let line = lb
        .wait_log("inherited ignored=", 1)
        .into_iter()
        .find(|l| l.contains("inherited ignored="))
        .unwrap();
    let field = |name: &str| {
        line.split(&format!("{name}="))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(|v| u64::from_str_radix(v, 16).unwrap())
            .unwrap()
    };
    // Bits are signal number - 1. Python itself ignores PIPE and XFSZ.
    let (hup, int, quit, usr1, usr2) = (1 << 0, 1 << 1, 1 << 2, 1 << 9, 1 << 11);
    assert_eq!(field("ignored") & (hup | int | quit), 0, "{line}");
    assert_eq!(field("blocked") & (usr1 | usr2), 0, "{line}");
    assert_eq!(field("blocked"), 0, "{line}");
    let fds: Vec<&str> = line
        .split("fds=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    let numbers: Vec<&str> = fds.iter().map(|f| f.split('=').next().unwrap()).collect();
    assert_eq!(numbers, ["0", "1", "2", "3"], "{line}");
    assert!(
        fds[3].starts_with("3=socket:"),
        "fd 3 is the channel: {line}"
    );
    // SIGHUP, ignored by lb's launcher, still reloads.
    lb.signal(libc::SIGHUP);
    lb.wait_log("reloaded 1 workers to generation 2", 1);
}

/// Counts a log's `spawn` lines over `for_` after start.
fn spawns_during(lb: &Lb, for_: Duration) -> usize {
    std::thread::sleep(for_);
    lb.log.count(": spawn `")
}

/// A worker that leaves young is a failed start: backed off like a crash,
/// one successor at a time. One that says READY then LEAVING and never
/// exits made 2,811 spawns in 4 s; one that exits right after LEAVING, 419.
#[test]
fn workers_that_keep_leaving_young_are_backed_off_like_a_crash_loop() {
    let dir = scratch("leaving-young");
    for (name, body) in [
        (
            "stays.py",
            "send(16)\nsend(18)\nwhile True:\n    time.sleep(1)",
        ),
        ("exits.py", "send(16)\nsend(18)\nsys.exit(0)"),
    ] {
        let worker = python_worker(&dir, name, body);
        let lb = Lb::start(&["--workers", "1", "--", "python3", &worker], &[], 1);
        let spawns = spawns_during(&lb, Duration::from_secs(4));
        eprintln!("{name}: {spawns} spawns in 4 s");
        // 100, 200, 400, 800, 1600 ms of back-off fit in 4 s.
        assert!(spawns <= 8, "{name}: {spawns} spawns in 4 s");
        lb.wait_log("is crash-looping", 1);
    }
}

/// A worker that sends LEAVING and exits at once is an announced exit,
/// every time: its last words are read before its exit is judged (the
/// exit used to win the race now and then: "unexpected", a restart with
/// back-off, no successor first).
#[test]
fn leaving_then_exiting_at_once_is_never_taken_for_a_crash() {
    let dir = scratch("leaving-exit");
    let worker = python_worker(
        &dir,
        "leave.py",
        "send(16)\ntime.sleep(0.25)\nsend(18)\nos._exit(0)",
    );
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--min-uptime",
            "100ms",
            "--",
            "python3",
            &worker,
        ],
        &[],
        2,
    );
    lb.wait_log("leaving; starting its replacement first", 12);
    let lines = lb.log.lines();
    let exits: Vec<&String> = lines.iter().filter(|l| l.contains(": exit (")).collect();
    assert!(exits.len() >= 8, "{exits:?}");
    assert!(
        exits
            .iter()
            .all(|l| l.contains("expected)") && !l.contains("unexpected")),
        "{exits:#?}"
    );
}
