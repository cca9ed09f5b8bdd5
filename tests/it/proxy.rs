//! `--mode proxy`: each worker listens on a loopback port of its own
//! (`PORT`, `{port}`) and lb relays bytes with splice: exact balancing,
//! half-close, back-pressure from slow peers, resets that stay with the
//! worker that died, least-connections from lb's own counts, `max_conns`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::util::load::{Load, Style, reloads_under_load};
use crate::util::*;

fn proxy(workers: usize, extra: &[&str], command: &[&str]) -> Lb {
    let n = workers.to_string();
    let mut args = vec!["--workers", n.as_str(), "--mode", "proxy"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    Lb::start(&args, &[], workers)
}

/// An echo server on $PORT: every byte back, then EOF after the client's.
const ECHO: &str = r#"
import os, socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn proxy_round_robin_is_exact_and_every_request_is_served() {
    let server = epoll_server();
    let lb = proxy(3, &[], &[&server, "{port}"]);
    assert_eq!(split(lb.addr, 3, 150), [50, 50, 50]);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let addr = lb.addr;
            std::thread::spawn(move || (0..50).filter(|_| try_get(addr, "/").is_ok()).count())
        })
        .collect();
    assert_eq!(
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum::<usize>(),
        400
    );
    let totals = lb.wait_all_closed();
    assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 550);
}

#[test]
fn proxy_relays_half_closes_and_slow_readers_exactly() {
    let dir = scratch("proxy-echo");
    let echo = dir.join("echo.py");
    std::fs::write(&echo, ECHO).unwrap();
    let lb = proxy(2, &[], &["python3", echo.to_str().unwrap()]);
    // 4 MiB out, then half-close; read it all back only after sending:
    // far more than the pipes and socket buffers hold, so lb must stop
    // reading the client while the echo waits for it.
    let payload: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = s.try_clone().unwrap();
    let expected = payload.len();
    let read = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300)); // a slow reader
        let mut got = Vec::with_capacity(expected);
        reader.read_to_end(&mut got).unwrap();
        got
    });
    s.write_all(&payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = read.join().unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "the bytes came back changed");
}

#[test]
fn proxy_worker_death_resets_only_its_own_connections() {
    let server = epoll_server();
    let lb = proxy(2, &[], &[&server, "{port}"]);
    let mut a = KeepAlive::open(lb.addr);
    let mut b = KeepAlive::open(lb.addr);
    let (sa, sb) = (slot_of(&a.get("/")), slot_of(&b.get("/")));
    assert_ne!(sa, sb);
    let (victim, survivor) = if sa == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    send_signal(lb.pid_of_slot(0), libc::SIGKILL);
    // The dead worker's connection ends...
    let mut buf = [0u8; 64];
    write!(victim.stream, "GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
    let n = victim.stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the killed worker's connection is closed");
    // ...the other worker's goes on.
    assert!(survivor.get("/").starts_with("hello from worker 1"));
    lb.wait_log("worker 0 gen 1: spawn", 2);
    lb.wait_log(": ready", 3);
    let deadline = Instant::now() + WAIT;
    while !(0..10).any(|_| try_get(lb.addr, "/").is_ok_and(|b| slot_of(&b) == 0)) {
        assert!(Instant::now() < deadline, "slot 0 never served again");
    }
}

#[test]
fn proxy_least_conn_counts_its_own_relays() {
    let server = epoll_server();
    let lb = proxy(2, &["--policy", "lc"], &[&server, "{port}"]);
    // lb counts relays itself; a released one ends once the worker has
    // answered the client's FIN with its own, so the first new connection
    // may still find worker 1 holding them.
    let count = split_after_worker_0_holds_four(lb.addr);
    assert!(
        count[1] >= 38,
        "least-conn should avoid the busy worker: {count:?}"
    );
}

#[test]
fn proxy_max_conns_holds_the_rest_in_the_backlog() {
    let server = epoll_server();
    let lb = proxy(1, &["--max-conns", "2"], &[&server, "{port}"]);
    let mut held: Vec<KeepAlive> = (0..2)
        .map(|_| {
            let mut c = KeepAlive::open(lb.addr);
            c.get("/");
            c
        })
        .collect();
    // A third connection waits: lb does not accept it while both relays are open.
    let third = send_request(lb.addr);
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        (&third).read(&mut probe).is_err(),
        "served beyond max_conns"
    );
    held.pop();
    third.set_read_timeout(Some(WAIT)).unwrap();
    assert!(read_body(third).unwrap().starts_with("hello from worker 0"));
}

#[test]
fn proxy_graceful_stop_lets_a_slow_response_finish() {
    let server = epoll_server();
    let mut lb = proxy(2, &[], &[&server, "{port}"]);
    assert!(lb.stop_during("/slow/800").starts_with("hello from worker"));
}

#[test]
fn proxy_kill_9_under_load_costs_only_the_dead_workers_connections() {
    let server = epoll_server();
    let lb = proxy(3, &[], &[&server, "{port}"]);
    // Connects to the dead worker's closed port go elsewhere.
    kill_under_load(&lb, 1, 3, "proxy");
}

#[test]
fn a_reload_cannot_switch_to_proxy_mode() {
    let dir = scratch("proxy-reload");
    let config = write_config(&dir, "lb.toml", &hello_pool("web", 1));
    let lb = Lb::start(&["--config", &config], &[], 1);
    let before = lb.pid_of_slot(0);
    write_config(
        &dir,
        "lb.toml",
        &format!("{}mode = \"proxy\"\n", hello_pool("web", 1)),
    );
    let out = lb.ctl(&["reload"]);
    assert!(
        out.contains("adds or removes shared or proxy mode"),
        "{out}"
    );
    assert_eq!(lb.pid_of_slot(0), before, "nothing was replaced");
    assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
}

/// Python's http.server, which exits at once on SIGTERM, as proxy workers.
fn python_http_proxy(dir: &std::path::Path) -> Lb {
    let server = python_http_server(dir);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    proxy(3, &[], &server)
}

/// A drained proxy worker is sent no new connection, its relays and the
/// connects in flight finish, and only then is it signalled: 10 reloads in
/// a row under 20 clients (`Connection: close`) fail nothing.
#[test]
fn proxy_ten_reloads_under_load_fail_nothing() {
    let lb = python_http_proxy(&scratch("proxy-reload"));
    let tally = reloads_under_load(&lb, 20, Style::Close, 3, 2..=11);
    eprintln!("proxy, 10 reloads: {tally:?}");
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
}

/// On stop, every connection lb accepted is relayed and answered; the
/// rest are refused (never accepted).
#[test]
fn proxy_stop_under_load_answers_every_accepted_connection() {
    let mut lb = python_http_proxy(&scratch("proxy-stop"));
    let load = Load::start(lb.addr, 20, Style::Close, None);
    load.wait_more(300);
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success(), "drained in time");
    let tally = load.stop();
    eprintln!("proxy, stop under load: {tally:?}");
    assert_eq!(tally.failed, tally.refused, "{:?}", tally.first);
    let stopped = lb.wait_log("stopped: ", 1);
    let line = stopped.iter().find(|l| l.contains("stopped: ")).unwrap();
    let count = |what: &str| {
        line.split(&format!(" {what}"))
            .next()
            .and_then(|r| r.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {what} count in {line:?}"))
    };
    assert_eq!(count("connections accepted"), count("dispatched"), "{line}");
}

/// A relay can outlive the worker it was sent to (the server closed its
/// side, the client has not), and the worker's table entry can then hold
/// a new process: the relay's end must not be counted against that one.
#[test]
fn a_relay_that_outlives_its_worker_is_not_counted_against_the_next() {
    let dir = scratch("proxy-outlive");
    let greeter = dir.join("greeter.py");
    std::fs::write(
        &greeter,
        r#"
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
while True:
    c, _ = s.accept()
    c.sendall(b"hi\n")
    c.close()
"#,
    )
    .unwrap();
    let greeter = greeter.to_str().unwrap();
    let lb = proxy(1, &["--drain-timeout", "2s"], &["python3", greeter]);
    // Read the greeting and the server's EOF, keep our side open.
    let held = |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi\n");
        s
    };
    let first = held(lb.addr);
    // Two reloads: the first worker drains (its relay still open), is
    // signalled after the linger and leaves; the third takes its entry.
    for generation in [2, 3] {
        let out = lb.ctl(&["reload", "--wait"]);
        assert!(
            out.contains(&format!("reloaded 1 workers to generation {generation}")),
            "{out}"
        );
    }
    let _second = held(lb.addr);
    assert_eq!(lb.totals(), [(1, 1)], "the newest worker holds one relay");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lb.totals(),
        [(1, 1)],
        "the old relay's end is not the newest worker's"
    );
}

/// The issue's slowloris, scaled down: with `--max-conns 10`, 15
/// connections that send half a request head and stall hold every relay.
/// The idle timeout resets them (both sides) after 1 s without a byte, so
/// 20 legitimate requests sent behind them are each answered within 3 s,
/// and every stalled one is closed.
#[test]
fn proxy_stalled_connections_are_reset_and_cannot_starve_the_rest() {
    let server = epoll_server();
    let lb = proxy(
        1,
        &["--max-conns", "10", "--proxy-idle-timeout", "1s"],
        &[&server, "{port}"],
    );
    let stalled: Vec<TcpStream> = (0..15)
        .map(|_| {
            let mut s = TcpStream::connect(lb.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: l").unwrap();
            s
        })
        .collect();
    // Every relay is taken by a stalled connection.
    let deadline = Instant::now() + WAIT;
    while lb.totals() != [(10, 10)] {
        assert!(Instant::now() < deadline, "{:?}", lb.totals());
        std::thread::sleep(Duration::from_millis(20));
    }
    let legit: Vec<_> = (0..20)
        .map(|_| {
            let addr = lb.addr;
            std::thread::spawn(move || {
                let sent = Instant::now();
                let s = send_request(addr);
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let body = read_body(s);
                (body, sent.elapsed())
            })
        })
        .collect();
    for t in legit {
        let (body, took) = t.join().unwrap();
        let body = body.expect("a legitimate request is answered");
        assert!(body.starts_with("hello from worker 0"), "{body}");
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
    }
    for mut s in stalled {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("a stalled connection read {n} bytes instead of a reset"),
        }
    }
    assert_eq!(lb.wait_all_closed(), [(35, 0)]);
    // Counted where operators look.
    assert_eq!(lb.status()["proxy_idle_timeouts"], 15);
}

/// A worker that listens with a backlog of 0 and never accepts: lb's
/// readiness probe takes the one place in its accept queue, and every
/// later SYN is dropped, so a connect to it hangs (for the kernel's SYN
/// retries, about two minutes). After `--proxy-connect-timeout` the
/// connect counts as refused: the client, whose request lb has not read,
/// goes to the other worker and is answered there, and the hung worker
/// gets nothing more while its port does not answer.
#[test]
fn proxy_a_connect_that_hangs_times_out_to_another_worker() {
    let dir = scratch("proxy-connect-timeout");
    let hole = dir.join("hole.py");
    std::fs::write(
        &hole,
        r#"
import os, socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(0)
while True:
    time.sleep(3600)
"#,
    )
    .unwrap();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "mode = \"proxy\"\n\
             [[pool]]\nname = \"hole\"\ncommand = \"python3\"\nargs = [\"{}\"]\ncount = 1\n\
             [[pool]]\nname = \"web\"\ncommand = \"{}\"\nargs = [\"{{port}}\"]\ncount = 1\n",
            hole.display(),
            epoll_server()
        ),
    );
    let lb = Lb::start(
        &["--config", &config, "--proxy-connect-timeout", "300ms"],
        &[],
        2,
    );
    // Round-robin sends one of the first two to the hole.
    for i in 0..6 {
        let sent = Instant::now();
        let s = send_request(lb.addr);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = read_body(s).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(body.starts_with("hello from worker 1"), "{body}");
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "request {i} answered after {:?}",
            sent.elapsed()
        );
    }
    assert_eq!(
        lb.totals(),
        [(0, 0), (6, 0)],
        "the hole was sent nothing, the other worker all"
    );
}
