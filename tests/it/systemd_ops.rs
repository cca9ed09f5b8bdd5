//! systemd for operators: the watchdog and STATUS= lines from the
//! supervisor loop, `$RUNTIME_DIRECTORY` for the control socket, lb under
//! the real `systemd-socket-activate`, and the shipped units checked by the
//! real `systemd-analyze` (verify, security). Tests that need a systemd
//! tool skip, saying so, where it is missing (.ci/run installs it).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

fn environ(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/environ")).unwrap()
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
fn notify_socket(name: &str) -> (UnixDatagram, PathBuf) {
    let path = scratch(name).join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (sock, path)
}

/// Every datagram that arrives within `span`, with when it came.
fn collect(sock: &UnixDatagram, span: Duration) -> Vec<(Instant, String)> {
    let end = Instant::now() + span;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    got
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_watchdog_is_pinged_at_half_its_period_with_status_lines() {
    let (sock, path) = notify_socket("watchdog");
    // WatchdogSec=400ms: a ping every 200ms.
    let mut lb = Lb::start(
        &["--workers", "2"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
        2,
    );
    let got = collect(&sock, Duration::from_secs(2));
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(
        (6..=14).contains(&pings.len()),
        "about 10 pings in 2s: {got:?}"
    );
    let longest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest < Duration::from_millis(400),
        "never a whole period without one: {longest:?}"
    );
    let env = environ(lb.pid_of_slot(0));
    assert!(
        !env.contains("WATCHDOG_USEC=") && !env.contains("NOTIFY_SOCKET="),
        "the watchdog is the master's, not the workers'"
    );
    // The status line: said once when it changes, not with every ping.
    let statuses = |got: &[(Instant, String)]| -> Vec<String> {
        got.iter()
            .filter_map(|(_, m)| m.strip_prefix("STATUS="))
            .map(String::from)
            .collect()
    };
    lb.signal(libc::SIGHUP);
    let mut seen = Vec::new();
    let end = Instant::now() + WAIT;
    while !seen
        .iter()
        .any(|s: &String| s == "2/2 workers ready, generation 2")
    {
        assert!(Instant::now() < end, "no end of reload in {seen:?}");
        seen.extend(statuses(&collect(&sock, Duration::from_millis(200))));
    }
    assert!(
        seen.iter().any(|s| s.ends_with("generation 2, reloading")),
        "{seen:?}"
    );
    lb.signal(libc::SIGTERM);
    let end = Instant::now() + WAIT;
    while !seen.iter().any(|s| s.starts_with("stopping: ")) {
        assert!(Instant::now() < end, "no stopping status in {seen:?}");
        seen.extend(statuses(&collect(&sock, Duration::from_millis(200))));
    }
    assert_eq!(lb.wait_exit().code(), Some(0));
}

#[test]
fn the_first_status_line_says_how_many_workers_are_ready() {
    let (sock, path) = notify_socket("status");
    let _lb = Lb::start(
        &["--workers", "3"],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
        3,
    );
    let got = collect(&sock, Duration::from_millis(800));
    let msgs: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    assert!(
        msgs.contains(&"STATUS=3/3 workers ready, generation 1"),
        "{msgs:?}"
    );
    assert!(!msgs.contains(&"WATCHDOG=1"), "no WatchdogSec=, no pings");
}

#[test]
fn a_watchdog_meant_for_another_pid_is_not_pinged() {
    let (sock, path) = notify_socket("watchdog-other");
    let _lb = Lb::start(
        &["--workers", "1"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
        1,
    );
    let got = collect(&sock, Duration::from_millis(800));
    assert!(!got.iter().any(|(_, m)| m == "WATCHDOG=1"), "{got:?}");
}

#[test]
fn the_control_socket_goes_in_runtime_directory() {
    let dir = scratch("runtime-dir").join("run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = dir.to_str().unwrap();
    let lb = Lb::start_command(
        lb_command(
            &["--listen", "127.0.0.1:0", "--workers", "1"],
            &[("RUNTIME_DIRECTORY", rt)],
        ),
        1,
    );
    let sock = dir.join(format!("lb-{}.sock", lb.addr.port()));
    assert!(sock.exists(), "{} is the socket", sock.display());
    // A subcommand in the service's environment (ExecReload=lb reload)
    // finds it, by the port or as the only master there.
    let listen = lb.addr.to_string();
    for args in [vec!["status", "--listen", &listen], vec!["status"]] {
        let out = lb_command(&args, &[("RUNTIME_DIRECTORY", rt)])
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("listening on {listen}")), "{text}");
    }
    drop(lb);
    // One that others may write to is refused, in one line.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = lb_command_through(
        &["timeout", "20"],
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[("RUNTIME_DIRECTORY", rt)],
    )
    .output()
    .unwrap();
    let (status, log) = (out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("writable by others") && log.contains(rt),
        "{log}"
    );
    assert_eq!(log.trim().lines().count(), 1, "{log}");
}

#[test]
fn lb_serves_what_systemd_socket_activate_binds() {
    if !which("systemd-socket-activate") {
        eprintln!("skipped: systemd-socket-activate not installed (Debian: systemd)");
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let control = scratch("socket-activate").join("lb.sock");
    // It starts lb at the first connection (as systemd does for a socket
    // unit whose service is not running): one, which lb then serves.
    let first = first_connection(port);
    let lb = Lb::start_command(
        lb_command_through(
            &["systemd-socket-activate", "-l", &listen],
            &["--workers", "2", "--control", control.to_str().unwrap()],
            &[],
        ),
        2,
    );
    drop(first.join().unwrap());
    assert_eq!(lb.addr.to_string(), listen, "the activated socket");
    assert_eq!(split(lb.addr, 2, 10), [5, 5]);
    let env = environ(lb.pid_of_slot(0));
    assert!(!env.contains("LISTEN_FDS="), "not the workers'");
}

/// The shipped units in a scratch directory, `ExecStart=` pointing at the
/// built lb (verify checks that the binary exists).
fn units(name: &str, dropin: bool) -> PathBuf {
    let dir = scratch(name).join("units");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = repo().join("docs/systemd");
    let service = std::fs::read_to_string(src.join("lb.service"))
        .unwrap()
        .replace("/usr/local/bin/lb", lb_bin());
    std::fs::write(dir.join("lb.service"), service).unwrap();
    std::fs::copy(src.join("lb.socket"), dir.join("lb.socket")).unwrap();
    if dropin {
        let d = dir.join("lb.service.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(
            src.join("lb.service.d/notify-reload.conf"),
            d.join("notify-reload.conf"),
        )
        .unwrap();
    }
    dir
}

/// `systemd-analyze verify` of the units in `dir` (and its drop-ins): exit
/// code and what it said (it warns on stderr and still exits 0).
fn verify(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["60", "systemd-analyze", "verify", "--man=no"])
        .arg(dir.join("lb.socket"))
        .arg(dir.join("lb.service"))
        // Drop-ins are looked up in the unit path only.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), text)
}

fn systemd_version() -> Option<u32> {
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn the_units_verify_clean_and_the_drop_in_where_systemd_has_it() {
    let Some(version) = systemd_version() else {
        eprintln!("skipped: systemd-analyze not installed (Debian: systemd)");
        return;
    };
    let (code, said) = verify(&units("verify", false));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.trim().is_empty(), "systemd {version} warns: {said}");
    // The drop-in for systemd >= 253: clean there; on older ones, refused
    // for its type and for nothing else (which is why it is a drop-in).
    let (code, said) = verify(&units("verify-dropin", true));
    assert_eq!(code, Some(0), "{said}");
    if version >= 253 {
        assert!(said.trim().is_empty(), "systemd {version} warns: {said}");
    } else {
        let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "systemd {version} read no drop-in");
        for l in lines {
            assert!(
                l.contains("notify-reload.conf")
                    && l.contains("Failed to parse service type, ignoring: notify-reload"),
                "systemd {version}: {l}"
            );
        }
    }
}

#[test]
fn the_service_is_hardened() {
    if systemd_version().is_none() {
        eprintln!("skipped: systemd-analyze not installed (Debian: systemd)");
        return;
    }
    let dir = units("security", false);
    let out = Command::new("timeout")
        .args(["60", "systemd-analyze", "security", "--offline=yes"])
        .arg(dir.join("lb.service"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for lb.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in {text}"));
    eprintln!("systemd-analyze security: {score}");
    // 9.6 (UNSAFE) unhardened; 2.5 with what the unit sets.
    assert!(score <= 3.0, "exposure {score}:\n{text}");
}

/// The syscalls of `systemd-analyze syscall-filter GROUP`, groups expanded.
fn filter_group(group: &str, into: &mut std::collections::BTreeSet<String>) {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", group])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            filter_group(name, into);
        } else {
            into.insert(name.to_string());
        }
    }
}

#[test]
fn every_syscall_lb_makes_is_in_the_units_filter() {
    if systemd_version().is_none() || !which("strace") {
        eprintln!("skipped: systemd-analyze or strace not installed (Debian: systemd, strace)");
        return;
    }
    let mut allowed = std::collections::BTreeSet::new();
    filter_group("@system-service", &mut allowed);
    assert!(allowed.contains("read"), "{allowed:?}");
    let trace = scratch("syscalls").join("trace");
    let control = scratch("syscalls").join("lb.sock");
    let trace_arg = trace.to_str().unwrap().to_string();
    let mut lb = Lb::start_command(
        lb_command_through(
            &["timeout", "60", "strace", "-f", "-qq", "-o", &trace_arg],
            &["--workers", "2", "--listen", "127.0.0.1:0"],
            &[("LB_CONTROL", control.to_str().unwrap())],
        ),
        2,
    );
    // Its life: connections, a reload, status, a drain.
    assert_eq!(split(lb.addr, 2, 10).iter().sum::<usize>(), 10);
    lb.signal(libc::SIGHUP);
    lb.wait_log("reloaded 2 workers to generation 2", 1);
    lb.signal(libc::SIGTERM);
    lb.wait_exit();
    let text = std::fs::read_to_string(&trace).unwrap();
    let used: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|call| call.split('(').next())
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(String::from)
        .collect();
    assert!(
        used.contains("accept4") && used.contains("sendmsg"),
        "{used:?}"
    );
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "not in SystemCallFilter=@system-service: {outside:?}"
    );
}
