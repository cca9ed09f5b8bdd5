//! Values out of bounds, and paths or limits the configuration cannot
//! use: refused at start with one line naming the value and its origin,
//! exit code 2, before the "listening on" line (nothing has started).

use crate::util::*;

/// Runs lb with `args` and `env`; asserts it refused them: exit code 2,
/// exactly one line, no "listening on". Returns the line.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let (status, log) = run_to_exit(args, env);
    assert_eq!(status.code(), Some(2), "{args:?}: {log}");
    assert_eq!(log.lines().count(), 1, "{args:?}: {log}");
    assert!(!log.contains("listening on"), "{args:?}: {log}");
    assert!(log.starts_with("lb: error: "), "{args:?}: {log}");
    log
}

#[test]
fn durations_that_would_overflow_are_refused_from_the_cli_and_lb_toml() {
    let log = refused(
        &["--workers", "1", "--ready-timeout", "9223372036854775807s"],
        &[],
    );
    assert!(
        log.contains("--ready-timeout")
            && log.contains("`9223372036854775807s`")
            && log.contains("1ms to 24h"),
        "{log}"
    );
    let log = refused(
        &["--workers", "1", "--drain-timeout", "2562047788015215h"],
        &[],
    );
    assert!(
        log.contains("--drain-timeout") && log.contains("`2562047788015215h`"),
        "{log}"
    );
    let log = refused(&["--workers", "1"], &[("LB_MIN_UPTIME", "25h")]);
    assert!(
        log.contains("LB_MIN_UPTIME") && log.contains("24h"),
        "{log}"
    );

    let dir = scratch("limits-toml");
    for (key, value) in [
        ("ready_timeout", "9223372036854775807s"),
        ("drain_timeout", "2562047788015215h"),
    ] {
        let config = write_config(
            &dir,
            "lb.toml",
            &format!("{key} = \"{value}\"\n{}", hello_pool("hello", 1)),
        );
        let log = refused(&["--config", &config], &[]);
        assert!(
            log.contains(&format!("`{key}` in {config}")) && log.contains(value),
            "{log}"
        );
    }
}

#[test]
fn a_zero_ready_timeout_is_refused() {
    let log = refused(&["--workers", "1", "--ready-timeout", "0s"], &[]);
    assert!(
        log.contains("invalid --ready-timeout `0s`") && log.contains("1ms to 24h"),
        "{log}"
    );
}

#[test]
fn a_worker_log_that_cannot_be_opened_is_named_before_listening() {
    let dir = scratch("limits-worker-log");
    // A directory: refused even for root.
    let as_dir = dir.to_str().unwrap();
    let log = refused(&["--workers", "1", "--worker-log", as_dir], &[]);
    assert!(
        log.contains("--worker-log") && log.contains(as_dir) && log.contains("os error"),
        "{log}"
    );
    let missing = "/nonexistent-lb-test-dir/workers.log";
    let config = write_config(
        &dir,
        "lb.toml",
        &format!("worker_log = \"{missing}\"\n{}", hello_pool("hello", 1)),
    );
    let log = refused(&["--config", &config], &[]);
    assert!(
        log.contains(&format!("`worker_log` in {config}")) && log.contains(missing),
        "{log}"
    );
}

#[test]
fn a_control_path_in_a_missing_directory_is_named_before_listening() {
    let path = "/nonexistent-lb-test-dir/lb.sock";
    let log = refused(&["--workers", "1", "--control", path], &[]);
    assert!(
        log.contains("--control") && log.contains(path) && log.contains("/nonexistent-lb-test-dir"),
        "{log}"
    );
}

#[test]
fn a_control_path_naming_another_file_is_refused_and_the_file_kept() {
    let dir = scratch("limits-control-file");
    let file = dir.join("precious.txt");
    std::fs::write(&file, "keep me").unwrap();
    let path = file.to_str().unwrap();
    let log = refused(&["--workers", "1", "--control", path], &[]);
    assert!(
        log.contains("--control") && log.contains(path) && log.contains("not a socket"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// The hard limit on open files, which lb raises its own soft limit to.
fn nofile_hard_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

#[test]
fn proxy_relays_beyond_the_open_files_limit_are_refused_before_listening() {
    let limit = nofile_hard_limit();
    if limit >= 7 << 20 {
        eprintln!("skipped: the open-files limit ({limit}) allows a million relays");
        return;
    }
    let log = refused(
        &[
            "--workers",
            "1",
            "--mode",
            "proxy",
            "--max-conns",
            "1048576",
            "--",
            "sleep",
            "60",
        ],
        &[],
    );
    assert!(
        log.contains("invalid --max-conns `1048576`") && log.contains(&limit.to_string()),
        "{log}"
    );
}
