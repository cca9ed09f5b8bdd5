//! `lb upgrade` and SIGUSR2: the master re-executes itself in place with
//! the binary now at the path it was started as — same pid, same workers,
//! same listeners — under load, with nothing failed; a binary that cannot
//! take over is refused while the old master serves on (docs/upgrade.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::load::{Load, Style};
use crate::util::*;

/// lb started from a copy of the binary in `dir` (so that the test can
/// replace the file), with a private control socket, on `127.0.0.1:0`.
fn start_copy(dir: &Path, args: &[&str], workers: usize) -> (Lb, PathBuf) {
    let exe = dir.join("lb");
    install(&exe, Path::new(lb_bin()));
    let control = dir.join("lb.sock");
    let mut full = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
    ];
    full.extend_from_slice(args);
    let mut lb = Lb::start_command(lb_command_at(&exe, &full, &[]), workers);
    lb.control = Some(control.to_str().unwrap().to_string());
    (lb, exe)
}

/// Puts `from` at `exe` the way a package manager does: a new file renamed
/// over the old (which the running image keeps, deleted).
/// (Copied by `cp`: a file this process wrote could be held open for
/// writing by a child another test forks meanwhile, and exec'ing it then
/// fails with ETXTBSY.)
fn install(exe: &Path, from: &Path) {
    let new = exe.with_extension("new");
    let copied = std::process::Command::new("cp")
        .arg(from)
        .arg(&new)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, exe).unwrap();
}

/// The status once the master answers with `upgrades` in-place upgrades
/// (it re-executes between the request and that).
fn wait_upgrades(lb: &Lb, upgrades: u64) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = lb.ctl(&["status", "--json"]);
        if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out)
            && s["upgrades"].as_u64() == Some(upgrades)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "no upgrade {upgrades}: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn worker_pids(status: &serde_json::Value) -> Vec<u64> {
    let mut pids: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    pids.sort_unstable();
    pids
}

/// What /proc says the master runs.
fn running_exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn upgrade_twice_under_load_drops_nothing() {
    let dir = scratch("upgrade-twice");
    let (mut lb, exe) = start_copy(&dir, &["--workers", "2"], 2);
    let pid = lb.pid();
    let before = lb.status();
    let pids = worker_pids(&before);
    assert_eq!(before["upgrades"].as_u64(), Some(0));
    assert_eq!(before["exe"].as_str(), Some(exe.to_str().unwrap()));
    let keep_alive = Load::start(lb.addr, 4, Style::KeepAlive, None);
    let close = Load::start(lb.addr, 4, Style::Close, None);
    keep_alive.wait_more(200);
    close.wait_more(100);

    install(&exe, Path::new(lb_bin()));
    assert!(
        running_exe(pid).ends_with(" (deleted)"),
        "the old file is gone"
    );
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.starts_with(&format!(
            "upgraded: master pid {pid} now runs {}",
            exe.display()
        )),
        "{out}"
    );
    assert!(out.contains("2 workers kept"), "{out}");
    keep_alive.wait_more(200);
    close.wait_more(100);

    install(&exe, Path::new(lb_bin()));
    lb.signal(libc::SIGUSR2);
    let after = wait_upgrades(&lb, 2);
    keep_alive.wait_more(200);
    close.wait_more(100);
    let (k, c) = (keep_alive.stop(), close.stop());
    for (style, t) in [("keep-alive", &k), ("close", &c)] {
        assert_eq!(t.failed, 0, "{style}: {} failed: {:?}", t.failed, t.first);
    }
    assert_eq!(lb.pid(), pid);
    assert_eq!(after["pid"].as_u64(), Some(u64::from(pid)), "same master");
    assert_eq!(worker_pids(&after), pids, "no worker was restarted");
    assert_eq!(
        running_exe(pid),
        exe.display().to_string(),
        "the new file runs"
    );
    let accepted = lb.status()["accepted"].as_u64().unwrap();
    assert!(
        accepted >= c.ok,
        "counters went on: {accepted} accepted, {} requests by close clients",
        c.ok
    );
    assert_eq!(lb.log.count("upgrade: re-executing"), 2);

    // The upgraded master reloads and stops as any.
    lb.reload(2, 2);
    assert!(worker_pids(&lb.status()).iter().all(|p| !pids.contains(p)));
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    assert!(
        !dir.join("lb.sock").exists(),
        "the control socket is removed"
    );
}

#[test]
fn a_binary_that_cannot_take_over_is_refused_and_the_master_serves_on() {
    let dir = scratch("upgrade-broken");
    let (lb, exe) = start_copy(&dir, &["--workers", "1"], 1);
    let pid = lb.pid();
    let worker = lb.pid_of_slot(0);
    let good = Path::new(lb_bin());
    let script = dir.join("broken");
    std::fs::write(&script, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    install(&exe, &script);
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("lb: error: upgrade refused: the new binary")
            && out.contains(exe.to_str().unwrap())
            && out.contains("broken build"),
        "{out}"
    );
    // A truncated copy (a half-finished download). Half a debug build
    // still runs far enough to pass the check (its debug info comes last),
    // then dies at the first page past its end: the headers tell.
    let bytes = std::fs::read(lb_bin()).unwrap();
    std::fs::write(&script, &bytes[..bytes.len() / 2]).unwrap();
    install(&exe, &script);
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("cut short"),
        "{out}"
    );
    // A whole binary, not executable.
    install(&exe, good);
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("cannot be run"),
        "{out}"
    );
    // And with the file gone.
    std::fs::remove_file(&exe).unwrap();
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("cannot open"),
        "{out}"
    );

    assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
    let status = lb.status();
    assert_eq!(status["upgrades"].as_u64(), Some(0));
    assert_eq!(lb.pid_of_slot(0), worker);
    assert!(
        running_exe(pid).ends_with(" (deleted)"),
        "still the old image"
    );

    install(&exe, good);
    let out = lb.ctl(&["upgrade"]);
    assert!(out.starts_with("upgraded:"), "{out}");
    assert_eq!(lb.pid_of_slot(0), worker);
    assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
}

#[test]
fn an_upgrade_keeps_a_unix_listener_and_its_counts() {
    let dir = scratch("upgrade-unix");
    let sock = dir.join("web.sock");
    let unix = format!("unix:{}", sock.display());
    let (mut lb, _exe) = start_copy(&dir, &["--listen", &unix, "--workers", "2"], 2);
    for _ in 0..10 {
        assert!(get(lb.addr, "/").starts_with("hello"));
        assert!(try_get_unix(&sock, "/").unwrap().starts_with("hello"));
    }
    let accepted = |s: &serde_json::Value| -> Vec<u64> {
        s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["accepted"].as_u64().unwrap())
            .collect()
    };
    let before = accepted(&lb.status());
    let out = lb.ctl(&["upgrade"]);
    assert!(out.starts_with("upgraded:"), "{out}");
    assert!(sock.exists(), "the socket file is kept");
    for _ in 0..10 {
        assert!(try_get_unix(&sock, "/").unwrap().starts_with("hello"));
    }
    let after = accepted(&lb.status());
    assert_eq!(
        after,
        vec![before[0], before[1] + 10],
        "{before:?} then {after:?}"
    );
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
    assert!(!sock.exists(), "the file lb made is removed when it stops");
}

#[test]
fn node_mode_is_refused_and_serves_on() {
    if !installed("node", "the Node upgrade refusal test") {
        return;
    }
    let dir = scratch("upgrade-node");
    let app = node_app();
    let (lb, _exe) = start_copy(
        &dir,
        &["--workers", "1", "--mode", "node", "--", "node", &app],
        1,
    );
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("node mode"),
        "{out}"
    );
    assert!(get(lb.addr, "/").contains("hello"));
    assert_eq!(lb.status()["upgrades"].as_u64(), Some(0));
}

#[test]
fn proxy_mode_is_refused_and_serves_on() {
    let dir = scratch("upgrade-proxy");
    let server = [
        "--workers",
        "1",
        "--mode",
        "proxy",
        "--",
        "python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "{port}",
    ];
    let (lb, _exe) = start_copy(&dir, &server, 1);
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("proxy mode"),
        "{out}"
    );
    assert!(get(lb.addr, "/").contains("Directory listing"));
    assert_eq!(lb.status()["upgrades"].as_u64(), Some(0));
}

/// A shared-mode server keeps its listeners' flags: gunicorn's worker polls
/// its non-blocking sockets; a new image that made them blocking left it
/// stuck in accept(), deaf to SIGTERM, and the stop killed it (seen).
#[test]
fn shared_gunicorn_is_upgraded_and_stops_in_time() {
    if !installed("gunicorn", "the gunicorn upgrade test") {
        return;
    }
    let dir = scratch("upgrade-gunicorn");
    gunicorn_app(&dir);
    let sock = dir.join("web.sock");
    let unix = format!("unix:{}", sock.display());
    let (mut lb, _exe) = start_copy(
        &dir,
        &[
            "--listen",
            &unix,
            "--workers",
            "2",
            "--mode",
            "shared",
            "--drain-timeout",
            "8s",
            "--",
            "gunicorn",
            "--workers",
            "1",
            "--chdir",
            dir.to_str().unwrap(),
            "app:app",
        ],
        2,
    );
    let load = Load::start(lb.addr, 4, Style::Close, None);
    load.wait_more(50);
    let out = lb.ctl(&["upgrade"]);
    assert!(out.starts_with("upgraded:"), "{out}");
    load.wait_more(50);
    let tally = load.stop();
    assert_eq!(tally.failed, 0, "{:?}", tally.first);
    assert!(
        try_get_unix(&sock, "/")
            .unwrap()
            .starts_with("hello from worker")
    );
    lb.signal(libc::SIGTERM);
    // (A worker killed at the drain timeout makes the exit code 1.)
    assert!(lb.wait_exit().success(), "every worker drained");
    assert_eq!(lb.log.count("killing"), 0);
}

/// A worker whose generation 2 takes 3 s to be ready (a reload of it is
/// under way that long).
const SLOW_FROM_GENERATION_2: &str = r#"
if os.environ["LB_GENERATION"] != "1":
    time.sleep(3)
send(16, 0)
serve_forever()
"#;

/// An upgrade asked for while a reload is switching slots is refused;
/// once the reload is done, it goes ahead.
#[test]
fn an_upgrade_during_a_reload_is_refused_and_works_after() {
    let dir = scratch("upgrade-mid-reload");
    let slow = python_worker(&dir, "slow.py", SLOW_FROM_GENERATION_2);
    let config = write_config(&dir, "lb.toml", &python_pool("slow", &slow, 2));
    let (lb, _exe) = start_copy(&dir, &["--config", &config], 2);
    std::thread::scope(|s| {
        let reload = s.spawn(|| lb.ctl(&["reload"]));
        lb.wait_log("gen 2: spawn", 1);
        let out = lb.ctl(&["upgrade"]);
        assert!(
            out.contains("upgrade refused") && out.contains("reload is in progress"),
            "{out}"
        );
        let out = reload.join().unwrap();
        assert!(out.contains("reloaded 2 workers to generation 2"), "{out}");
    });
    assert_eq!(lb.status()["upgrades"].as_u64(), Some(0));
    let out = lb.ctl(&["upgrade"]);
    assert!(out.starts_with("upgraded:"), "{out}");
}

/// The new image builds its start on the configuration as the file says it
/// now: a setting lb fixes at start (a pool's mode, the control socket)
/// changed there since is refused by the check, not found by the new image
/// with the workers already given up (a reviewer saw both: a pool switched
/// to shared mode "upgraded" into a loop that accepted nothing, a moved
/// control socket ended the new image and its workers).
#[test]
fn a_start_up_setting_changed_in_the_file_is_refused() {
    let dir = scratch("upgrade-file-changed");
    let pool = hello_pool("web", 2);
    let config = write_config(&dir, "lb.toml", &pool);
    let (lb, _exe) = start_copy(&dir, &["--config", &config], 2);
    let worker = lb.pid_of_slot(0);
    write_config(&dir, "lb.toml", &format!("{pool}mode = \"shared\"\n"));
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("pool `web` mode shared"),
        "{out}"
    );
    // (The control socket is the command line's here; a log file stands
    // for the settings read from the file.)
    let log = dir.join("elsewhere").join("lb.log");
    write_config(
        &dir,
        "lb.toml",
        &format!("log_file = \"{}\"\n{pool}", log.display()),
    );
    let out = lb.ctl(&["upgrade"]);
    assert!(
        out.contains("upgrade refused") && out.contains("log_file"),
        "{out}"
    );
    assert!(get(lb.addr, "/").starts_with("hello from worker"));
    assert_eq!(lb.pid_of_slot(0), worker);
    // Restored: it goes ahead.
    write_config(&dir, "lb.toml", &pool);
    let out = lb.ctl(&["upgrade"]);
    assert!(out.starts_with("upgraded:"), "{out}");
    assert!(get(lb.addr, "/").starts_with("hello from worker"));
}
