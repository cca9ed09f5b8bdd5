//! Several listeners on one pool: IPv4, IPv6 and Unix sockets, each with
//! its own PROXY settings, inherited from systemd by name, and handed to
//! shared-mode servers as LISTEN_FDS.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::util::*;

/// One `Connection: close` GET over a Unix socket; the whole response.
fn unix_get(path: &Path, preamble: &[u8]) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(WAIT))?;
    s.write_all(preamble)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Keep-alive over a Unix socket: `n` requests on one connection, each
/// answer read by its Content-Length.
fn unix_keep_alive(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut bodies = Vec::new();
    for _ in 0..n {
        s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                return Err(std::io::Error::other("EOF before a response"));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no length in {head:?}")))?;
        let mut body = vec![0; len];
        s.read_exact(&mut body)?;
        bodies.push(String::from_utf8_lossy(&body).to_string());
    }
    Ok(bodies)
}

fn tcp(addr: &str) -> SocketAddr {
    addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"))
}

/// IPv4, IPv6 and a Unix socket (mode 0660) served by one pool of
/// bundled workers; every request answered, close and keep-alive, by
/// both workers; counted per listener; the socket file removed at stop.
#[test]
fn ipv4_ipv6_and_unix_listeners_serve_one_pool() {
    let dir = scratch("listeners-three");
    let path = dir.join("app.sock");
    let _ = std::fs::remove_file(&path);
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "workers = 2\nlisten = [\"127.0.0.1:0\", \"[::1]:0\", {{ address = \"unix:{}\", mode \
             = \"0660\" }}]\n",
            path.display()
        ),
    );
    let control = dir.join("lb.sock");
    let mut lb = Lb::start_command(
        lb_command(
            &[
                "--config",
                &config,
                "--control",
                control.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
            ],
            &[],
        ),
        2,
    );
    lb.control = Some(control.to_str().unwrap().to_string());
    let listening = lb.listening();
    assert_eq!(listening.len(), 3, "{listening:?}");
    assert_eq!(listening[2], format!("unix:{}", path.display()));
    let (v4, v6) = (tcp(&listening[0]), tcp(&listening[1]));
    assert!(v6.is_ipv6());
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut failures = 0;
    let mut slots = [0usize; 2];
    for _ in 0..10 {
        for body in [try_get(v4, "/"), try_get(v6, "/")] {
            match body {
                Ok(b) => slots[slot_of(&b)] += 1,
                Err(_) => failures += 1,
            }
        }
        match unix_get(&path, b"") {
            Ok(r) if r.starts_with("HTTP/1.1 200") => {
                slots[slot_of(r.split("\r\n\r\n").nth(1).unwrap())] += 1
            }
            _ => failures += 1,
        }
    }
    match unix_keep_alive(&path, 20) {
        Ok(bodies) => assert!(bodies.iter().all(|b| b.starts_with("hello from worker"))),
        Err(e) => panic!("keep-alive over the Unix socket: {e}"),
    }
    assert_eq!(failures, 0);
    assert!(
        slots[0] >= 10 && slots[1] >= 10,
        "both workers serve: {slots:?}"
    );

    let status = lb.status();
    let per: Vec<u64> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["accepted"].as_u64().unwrap())
        .collect();
    assert_eq!(per, [10, 10, 11], "{status}");
    let text = lb.ctl(&["status"]);
    assert!(
        text.contains(&format!("listener unix:{}: 11 accepted", path.display())),
        "{text}"
    );
    let scrape = get(tcp(&lb.metrics_addr()), "/metrics");
    for (address, n) in listening.iter().zip([10, 10, 11]) {
        let line = format!("lb_listener_connections_accepted_total{{listener=\"{address}\"}} {n}");
        assert!(scrape.contains(&line), "{line} in {scrape}");
    }

    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    assert!(!path.exists(), "lb removes the socket file it made");
}

/// A socket file nobody listens on (a killed server's) is replaced; a live
/// one, or a file that is no socket, is refused in one line and kept.
#[test]
fn a_stale_unix_socket_is_replaced_and_a_live_one_or_a_plain_file_refused() {
    let dir = scratch("listeners-stale");
    let path = dir.join("app.sock");
    let _ = std::fs::remove_file(&path);
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a stale socket file");
    let listen = format!("unix:{}", path.display());
    let control = dir.join("lb.sock");
    let lb = Lb::start_command(
        lb_command(
            &[
                "--listen",
                &listen,
                "--workers",
                "1",
                "--control",
                control.to_str().unwrap(),
            ],
            &[],
        ),
        1,
    );
    assert!(unix_get(&path, b"").unwrap().starts_with("HTTP/1.1 200"));
    drop(lb);

    let _ = std::fs::remove_file(&path);
    let live = UnixListener::bind(&path).unwrap();
    let (status, log) = run_to_exit(&["--listen", &listen, "--workers", "1"], &[]);
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("another process listens on this socket"),
        "{log}"
    );
    assert!(path.exists(), "the live socket is kept");
    drop(live);

    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, "precious").unwrap();
    let (status, log) = run_to_exit(&["--listen", &listen, "--workers", "1"], &[]);
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(log.contains("not a socket is in the way"), "{log}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

/// PROXY headers on one listener only: the Unix socket a local balancer
/// writes to sends them (and the worker sees the client it names), the
/// TCP listener serves direct clients.
#[test]
fn proxy_protocol_is_set_per_listener() {
    let dir = scratch("listeners-proxy");
    let path = dir.join("from-haproxy.sock");
    let _ = std::fs::remove_file(&path);
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "workers = 1\n[[listen]]\naddress = \"127.0.0.1:0\"\n[[listen]]\naddress = \
             \"unix:{}\"\nproxy_protocol = \"v1\"\n",
            path.display()
        ),
    );
    let lb = Lb::start_command(lb_command(&["--config", &config], &[]), 1);
    let direct = get(tcp(&lb.listening()[0]), "/");
    assert!(
        direct.starts_with("hello from worker 0 (pid"),
        "no header, no client address: {direct}"
    );
    let proxied = unix_get(&path, b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 80\r\n").unwrap();
    assert!(
        proxied.contains("to a client from 203.0.113.7:4242"),
        "{proxied}"
    );
    // Without its header, the Unix listener's connection is refused.
    let bare = unix_get(&path, b"").unwrap_or_default();
    assert!(!bare.starts_with("HTTP/1.1 200"), "{bare}");
}

/// `0.0.0.0:P` beside `[::]:P`: the IPv6 one is made IPv6-only, so both
/// bind, and each family reaches its own.
#[test]
fn the_ipv4_and_ipv6_wildcards_share_a_port() {
    let port = free_port();
    let v4 = format!("0.0.0.0:{port}");
    let v6 = format!("[::]:{port}");
    let control = scratch("listeners-dual").join("lb.sock");
    let lb = Lb::start_command(
        lb_command(
            &[
                "--listen",
                &v4,
                "--listen",
                &v6,
                "--workers",
                "1",
                "--control",
                control.to_str().unwrap(),
            ],
            &[],
        ),
        1,
    );
    assert_eq!(lb.listening(), [v4, v6]);
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        assert!(
            get(tcp(&addr), "/").starts_with("hello from worker 0"),
            "{addr}"
        );
    }
}

/// systemd passes a TCP socket and a Unix one, named; the `[[listen]]`
/// table of each name gives its settings (the PROXY header on `edge`).
#[test]
fn socket_activation_with_two_named_fds() {
    if !installed("systemd-socket-activate", "the two-socket activation test") {
        return;
    }
    let dir = scratch("listeners-activate");
    let path = dir.join("edge.sock");
    let _ = std::fs::remove_file(&path);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Listed in the other order: the names, not the places, match.
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "workers = 1\n[[listen]]\nname = \"edge\"\naddress = \"unix:{}\"\nproxy_protocol = \
             \"v1\"\n[[listen]]\nname = \"web\"\naddress = \"{listen}\"\n",
            path.display()
        ),
    );
    let control = dir.join("lb.sock");
    let first = first_connection(port);
    let lb = Lb::start_command(
        lb_command_through(
            &[
                "systemd-socket-activate",
                "-l",
                &listen,
                "-l",
                path.to_str().unwrap(),
                "--fdname=web:edge",
            ],
            &["--config", &config, "--control", control.to_str().unwrap()],
            &[],
        ),
        1,
    );
    drop(first.join().unwrap());
    assert_eq!(
        lb.listening(),
        [listen.clone(), format!("unix:{}", path.display())]
    );
    assert!(get(tcp(&listen), "/").starts_with("hello from worker 0 (pid"));
    let proxied = unix_get(&path, b"PROXY TCP4 198.51.100.2 10.0.0.1 5000 80\r\n").unwrap();
    assert!(
        proxied.contains("to a client from 198.51.100.2:5000"),
        "{proxied}"
    );
    drop(lb);
    assert!(
        path.exists(),
        "systemd's socket file is systemd's to remove"
    );
}

/// Shared mode: every listener reaches each server as LISTEN_FDS (3 on),
/// named in LISTEN_FDNAMES; gunicorn serves both a TCP port and a Unix
/// socket from them.
#[test]
fn shared_gunicorn_serves_every_listener() {
    if !installed("gunicorn", "the shared-mode several-listeners test") {
        return;
    }
    let dir = scratch("listeners-gunicorn");
    let path = dir.join("app.sock");
    let _ = std::fs::remove_file(&path);
    std::fs::write(
        dir.join("app.py"),
        "import os\ndef app(environ, start_response):\n    body = ('hello from worker %s (pid \
         %d) fds %s %s\\n' % (os.environ['LB_WORKER_ID'], os.getpid(), \
         os.environ.get('LISTEN_FDNAMES'), os.environ.get('EINHORN_FD_COUNT'))).encode()\n    \
         start_response('200 OK', [('Content-Length', str(len(body)))])\n    return [body]\n",
    )
    .unwrap();
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[listen]]\naddress = \"127.0.0.1:0\"\n[[listen]]\naddress = \"unix:{}\"\nname = \
             \"local\"\n[[pool]]\nname = \"web\"\ncommand = \"gunicorn\"\nargs = [\"--workers\", \
             \"1\", \"--chdir\", \"{}\", \"app:app\"]\nmode = \"shared\"\ncount = 2\n",
            path.display(),
            dir.display()
        ),
    );
    let control = dir.join("lb.sock");
    let mut cmd = lb_command(
        &["--config", &config, "--control", control.to_str().unwrap()],
        &[],
    );
    cmd.current_dir(&dir);
    let lb = Lb::start_command(cmd, 2);
    lb.wait_log(&format!(",unix:{} (", path.display()), 2);
    let addr = tcp(&lb.listening()[0]);
    let mut failures = 0;
    for _ in 0..20 {
        match try_get(addr, "/") {
            Ok(b) if b.contains("fds web:local 2") => {}
            _ => failures += 1,
        }
        match unix_get(&path, b"") {
            Ok(r) if r.contains("fds web:local 2") => {}
            _ => failures += 1,
        }
    }
    assert_eq!(failures, 0);
}

/// `--dispatch auto` with two listeners: the master picks, said in a line;
/// `kernel` is refused in one.
#[test]
fn kernel_dispatch_with_several_listeners_falls_back_or_is_refused() {
    let dir = scratch("listeners-kernel");
    let path = dir.join("k.sock");
    let _ = std::fs::remove_file(&path);
    let unix = format!("unix:{}", path.display());
    let lb = Lb::start(
        &["--listen", &unix, "--workers", "1", "--dispatch", "auto"],
        &[],
        1,
    );
    lb.wait_log(
        "dispatch auto: the master picks (lb listens on 2 addresses",
        1,
    );
    assert!(get(lb.addr, "/").starts_with("hello"));
    drop(lb);
    let (status, log) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            &unix,
            "--dispatch",
            "kernel",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("kernel dispatch steers one TCP listener"),
        "{log}"
    );
}

/// Proxy mode with `send_proxy`: a client of the Unix listener has no
/// address, and the worker is told so (v1 `UNKNOWN`, v2 `AF_UNSPEC`)
/// rather than the connection being dropped.
#[test]
fn proxy_mode_tells_the_worker_a_unix_client_has_no_address() {
    let dir = scratch("listeners-send-proxy");
    let server = dir.join("server.py");
    std::fs::write(&server, crate::proxy_protocol::HEADER_SERVER).unwrap();
    let path = dir.join("p.sock");
    let unix = format!("unix:{}", path.display());
    for (version, said) in [("v1", "v1 PROXY UNKNOWN"), ("v2", "v2 21 unspec 0")] {
        let _ = std::fs::remove_file(&path);
        let lb = Lb::start(
            &[
                "--listen",
                &unix,
                "--workers",
                "1",
                "--mode",
                "proxy",
                "--send-proxy",
                version,
                "--",
                "python3",
                server.to_str().unwrap(),
            ],
            &[],
            1,
        );
        let reply = unix_get(&path, b"").unwrap();
        assert!(
            reply.ends_with(&format!("{said} | GET / HTTP/1.1\n")),
            "{reply}"
        );
        drop(lb);
    }
}

/// A local HAProxy writing to lb's Unix listener with `send-proxy-v2`
/// (the set-up docs/listeners.md describes): the worker sees each real
/// client, 20 requests, none failed.
#[test]
fn haproxy_send_proxy_v2_to_a_unix_listener_names_every_client() {
    use crate::proxy_protocol::{Haproxy, have};
    if !have("haproxy") {
        eprintln!("haproxy is not installed: skipped (apt-get install haproxy)");
        return;
    }
    let dir = scratch("listeners-haproxy");
    let path = dir.join("edge.sock");
    let _ = std::fs::remove_file(&path);
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "workers = 2\n[[listen]]\naddress = \"unix:{}\"\nproxy_protocol = \"v2\"\n",
            path.display()
        ),
    );
    // (Not `Lb::start`: its --listen would replace the file's list.)
    let control = dir.join("lb.sock");
    let mut lb = Lb::start_command(
        lb_command(
            &["--config", &config, "--control", control.to_str().unwrap()],
            &[],
        ),
        2,
    );
    lb.control = Some(control.to_str().unwrap().to_string());
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _h = Haproxy::start(
        &dir,
        &front.to_string(),
        format!("unix@{}", path.display()),
        "send-proxy-v2",
    );
    let mut slots = [0usize; 2];
    let deadline = std::time::Instant::now() + WAIT;
    for _ in 0..20 {
        // (HAProxy may still be starting.)
        let s = loop {
            match std::net::TcpStream::connect(front) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        let me = s.local_addr().unwrap();
        let mut s = s;
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .unwrap();
        let body = read_body(s).unwrap();
        assert!(body.contains(&format!("to a client from {me} ")), "{body}");
        slots[slot_of(&body)] += 1;
    }
    assert_eq!(slots, [10, 10]);
    let status = lb.status();
    assert_eq!(status["proxy_headers"]["v2"].as_u64(), Some(20), "{status}");
    drop(lb);
}

/// Clients of a Unix listener while lb stops: each is served whole, or its
/// connect is refused (the file is gone first); none is reset or cut off
/// after it connected.
#[test]
fn clients_of_a_unix_listener_are_served_or_refused_at_stop_never_cut() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = scratch("listeners-unix-stop");
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let unix = format!("unix:{}", path.display());
    let mut lb = Lb::start(&["--listen", &unix, "--workers", "2"], &[], 2);
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused, cut) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (path, stop) = (path.clone(), Arc::clone(&stop));
            let (served, refused, cut) =
                (Arc::clone(&served), Arc::clone(&refused), Arc::clone(&cut));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = UnixStream::connect(&path) else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    };
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let mut out = String::new();
                    let ok = s
                        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                        .and_then(|_| s.read_to_string(&mut out))
                        .is_ok()
                        && out.starts_with("HTTP/1.1 200")
                        && out.contains("hello from worker");
                    if ok {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        cut.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    while served.load(Ordering::Relaxed) < 200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (s, r, c) = (
        served.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        cut.load(Ordering::Relaxed),
    );
    eprintln!("at stop: {s} served, {r} refused at connect, {c} cut");
    assert_eq!(c, 0, "{s} served, {r} refused");
    assert!(r > 0, "the clients kept trying after the stop");
    assert!(!path.exists());
}
