//! A small deterministic fuzz of the configuration: random and edge values
//! for every flag, environment variable and `lb.toml` key (and `lb.toml`
//! text that is not TOML at all), through clap and [`super::load`], then
//! [`super::preflight`]. Asserts that nothing panics, that every refusal
//! is exactly one line, and that whatever is accepted is within bounds
//! (so no deadline computed from it can overflow).
//!
//! A fixed seed and a few hundred cases keep it fast and reproducible;
//! `LB_FUZZ_SEED` and `LB_FUZZ_CASES` run others.

mod inputs;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::settings::{self, Spec};
use super::{Config, bounds, defaults, load, preflight};
use inputs::{COMMANDS, Rng, setting_value, toml_file, value};

/// Every flag and variable but `--config` / `LB_CONFIG` (a case picks
/// those itself), from the table.
fn settings_but_config() -> impl Iterator<Item = &'static Spec> {
    settings::ALL
        .iter()
        .copied()
        .filter(|s| s.key != settings::CONFIG.key)
}

/// One case: a command line, an environment and maybe an lb.toml.
#[derive(Debug)]
struct Case {
    argv: Vec<String>,
    env: HashMap<String, String>,
    /// The lb.toml written for it (shown when a case fails).
    #[allow(dead_code)]
    file: Option<String>,
}

fn case(rng: &mut Rng, toml_path: &Path, scratch: &Path) -> Case {
    let mut argv = vec!["lb".to_string()];
    // About two settings per layer, however many lb has: each new one must
    // not make an accepted case rarer (the check below needs both sides).
    let per_setting = (200 / settings_but_config().count().max(1)) as u64;
    for s in settings_but_config() {
        if rng.chance(per_setting) {
            // (clap itself refuses an empty value.)
            let v = setting_value(rng, s.key);
            if !v.is_empty() {
                argv.push(format!("{}={v}", s.flag));
            }
        }
    }
    let mut env: HashMap<String, String> = HashMap::new();
    for s in settings_but_config() {
        if rng.chance(per_setting) {
            env.insert(s.env.to_string(), setting_value(rng, s.key));
        }
    }
    let mut file = None;
    let config_paths = [
        toml_path.to_str().unwrap().to_string(),
        "/nonexistent/lb.toml".into(),
        scratch.to_str().unwrap().to_string(),
        String::new(),
    ];
    if rng.chance(60) {
        let bytes = toml_file(rng);
        std::fs::write(toml_path, &bytes).unwrap();
        file = Some(String::from_utf8_lossy(&bytes).into_owned());
        let path = if rng.chance(90) {
            config_paths[0].clone()
        } else {
            rng.pick(&config_paths).clone()
        };
        if rng.chance(50) && !path.is_empty() {
            argv.push(format!("--config={path}"));
        } else {
            env.insert("LB_CONFIG".into(), path);
        }
    }
    if rng.chance(30) {
        argv.push("--".into());
        argv.push(if rng.chance(80) {
            rng.pick(COMMANDS).to_string()
        } else {
            value(rng)
        });
        for _ in 0..rng.below(3) {
            argv.push(if rng.chance(50) {
                rng.pick(&["-e", "x", "app.js", "-c", "true"]).to_string()
            } else {
                value(rng)
            });
        }
    }
    Case { argv, env, file }
}

/// Everything `load` accepted is within bounds, and the deadlines made
/// from it can be computed.
fn check_accepted(c: &Config, case: &Case) {
    let in_range = |d: std::time::Duration, min| (min..=bounds::DURATION_MAX).contains(&d);
    assert!(in_range(c.drain_timeout, bounds::TIMEOUT_MIN), "{case:?}");
    assert!(in_range(c.ready_timeout, bounds::TIMEOUT_MIN), "{case:?}");
    assert!(
        in_range(c.min_uptime, std::time::Duration::ZERO),
        "{case:?}"
    );
    assert!(
        in_range(c.proxy_connect_timeout, bounds::TIMEOUT_MIN),
        "{case:?}"
    );
    assert!(
        c.proxy_idle_timeout
            .is_none_or(|d| in_range(d, bounds::TIMEOUT_MIN)),
        "{case:?}"
    );
    let now = Instant::now();
    let _ = (
        now + c.drain_timeout,
        now + c.ready_timeout,
        now + c.min_uptime,
        now + c.proxy_connect_timeout,
        now + c.proxy_idle_timeout.unwrap_or_default() * 2,
    );
    for l in &c.listeners {
        assert!((1..=bounds::BACKLOG_MAX).contains(&l.backlog), "{case:?}");
    }
    assert!(
        (1..=bounds::MAX_CONNS_MAX).contains(&c.max_conns),
        "{case:?}"
    );
    assert!(
        (1..=defaults::MAX_WORKERS).contains(&c.reload_parallel),
        "{case:?}"
    );
    assert!(
        (1..=bounds::WORKER_QUEUE_MAX).contains(&c.worker_queue),
        "{case:?}"
    );
    assert!(
        c.stall_timeout.is_none_or(|d| d <= bounds::DURATION_MAX),
        "{case:?}"
    );
    assert!((1..=defaults::MAX_WORKERS).contains(&c.slots()), "{case:?}");
    assert!(
        c.max_conns_per_worker
            .is_none_or(|n| (1..=bounds::CONNS_PER_WORKER_MAX).contains(&n)),
        "{case:?}"
    );
    assert!(
        c.max_rss
            .is_none_or(|n| (bounds::RSS_MIN..=bounds::RSS_MAX).contains(&n)),
        "{case:?}"
    );
    for p in &c.pools {
        assert!(p.count >= 1, "{case:?}");
        assert!((1..=bounds::WEIGHT_MAX).contains(&p.weight), "{case:?}");
        assert_ne!(p.port, Some(0), "{case:?}");
    }
}

/// An error as `main` prints it: exactly one line, no control character.
fn check_refusal(text: &str, case: &Case) {
    assert!(!text.is_empty(), "{case:?}");
    assert!(
        !text.chars().any(char::is_control),
        "not one clean line: {text:?}\n{case:?}"
    );
    assert_eq!(text.lines().count(), 1, "{text:?}\n{case:?}");
}

#[test]
fn random_configurations_never_panic_and_refusals_are_one_line() {
    let seed = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1bc_0f16_u64);
    let cases: usize = std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let scratch = std::env::temp_dir().join(format!("lb-config-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let toml_path = scratch.join("lb.toml");
    let logs: Vec<Option<PathBuf>> = vec![
        None,
        Some(scratch.join("workers.log")),
        Some(scratch.clone()),
        Some(scratch.join("missing/workers.log")),
    ];
    let sockets = [
        scratch.join("lb.sock"),
        scratch.join("missing/lb.sock"),
        toml_path.clone(),
        scratch.join("x".repeat(120)),
    ];
    let path_var = std::env::var("PATH").ok();
    let mut rng = Rng(seed);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..cases {
        let case = case(&mut rng, &toml_path, &scratch);
        let args = {
            use clap::Parser;
            match crate::cli::Cli::try_parse_from(&case.argv) {
                Ok(cli) => cli.start,
                Err(e) => panic!("clap refused {:?}: {e}", case.argv),
            }
        };
        let env = |k: &str| {
            if k == "PATH" {
                path_var.clone()
            } else {
                case.env.get(k).cloned()
            }
        };
        let result = catch_unwind(AssertUnwindSafe(|| load(&args, &env)))
            .unwrap_or_else(|_| panic!("load panicked on {case:?}"));
        match result {
            Ok(mut config) => {
                accepted += 1;
                check_accepted(&config, &case);
                // The checks at start, on paths of this test's own.
                // (Preflight creates the log files: never in the cwd.)
                config.worker_log = rng.pick(&logs).clone();
                config.log_file = rng.pick(&logs).clone();
                let control = rng.pick(&sockets).clone();
                let open_files = Some(1 << rng.below(24));
                let checked = catch_unwind(AssertUnwindSafe(|| {
                    preflight(&config, &control, open_files)
                }))
                .unwrap_or_else(|_| panic!("preflight panicked on {case:?}"));
                if let Err(e) = checked {
                    check_refusal(&e.to_string(), &case);
                }
            }
            Err(e) => {
                refused += 1;
                check_refusal(&e.to_string(), &case);
            }
        }
    }
    eprintln!("seed {seed:#x}: {accepted} accepted, {refused} refused of {cases}");
    // The generator reaches both sides.
    assert!(accepted > cases / 20, "{accepted} accepted of {cases}");
    assert!(refused > cases / 2, "{refused} refused of {cases}");
    let _ = std::fs::remove_dir_all(&scratch);
}
