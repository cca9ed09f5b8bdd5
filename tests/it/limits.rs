//! Values out of bounds: refused at start with one line naming the value
//! and its origin, exit code 2, before the "listening on" line (nothing has
//! started).

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
