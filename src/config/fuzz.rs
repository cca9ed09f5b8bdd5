//! A small deterministic fuzz of the configuration: random and edge values
//! for every flag, environment variable and `lb.toml` key (and `lb.toml`
//! text that is not TOML at all), through clap and [`super::load`], then
//! [`super::preflight`]. Asserts that nothing panics, that every refusal
//! is exactly one line, and that whatever is accepted is within bounds
//! (so no deadline computed from it can overflow).
//!
//! A fixed seed and a few hundred cases keep it fast and reproducible;
//! `LB_FUZZ_SEED` and `LB_FUZZ_CASES` run others.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Config, bounds, defaults, load, preflight};

/// SplitMix64: tiny, and good enough to pick test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values that sit on or beyond an edge of some setting.
const EDGES: &[&str] = &[
    "",
    " ",
    "0",
    "1",
    "-1",
    "+1",
    "01",
    "1.5",
    ".",
    "1.",
    ".5",
    "1e9",
    "NaN",
    "inf",
    "255",
    "1023",
    "1024",
    "1025",
    "10000",
    "10001",
    "65535",
    "65536",
    "1048576",
    "1048577",
    "2147483647",
    "4294967295",
    "4294967296",
    "1000000000000",
    "1000000000001",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "0s",
    "0ms",
    "0.0001ms",
    "0.5ms",
    "1ms",
    "1 s",
    "24h",
    "1440m",
    "86400",
    "86400.001",
    "25h",
    "9223372036854775807s",
    "2562047788015215h",
    "18446744073709551615ms",
    "1e400s",
    "5d",
    "512",
    "1023K",
    "1M",
    "64mib",
    "1024G",
    "1025G",
    "1T",
    "99999999999999G",
    "rr",
    "WRR",
    "least-conn",
    "fastest",
    "native",
    "node",
    "shim",
    "proxy",
    "shared",
    "SIGQUIT",
    "quit",
    "9",
    "KILL",
    "127.0.0.1:0",
    "[::1]:0",
    "0.0.0.0:65535",
    "127.0.0.1:65536",
    "127.0.0.1",
    "::1",
    "a\nb",
    "line\r",
    "\t",
    "\u{0}",
    "nul\u{0}inside",
    "\u{1b}[31m",
    "é",
    "日本",
    "💥",
    "{port}",
    "--",
    "-w",
    "=",
    "\"",
    "'",
    "\\",
];

/// Random text from characters that make numbers, units and trouble. No
/// `:`, so an address is never looked up in DNS.
fn random_text(rng: &mut Rng) -> String {
    const CHARS: &[char] = &[
        '0', '1', '2', '5', '9', '9', '.', ' ', '-', '+', 's', 'm', 'h', 'k', 'K', 'M', 'G', 'b',
        'B', 'i', 'x', '\n', '\t', '\u{0}', 'é', '💥', '"', '\\', '=', '[', ']', '/',
    ];
    let len = rng.below(24);
    (0..len).map(|_| *rng.pick(CHARS)).collect()
}

fn value(rng: &mut Rng) -> String {
    match rng.below(10) {
        0..=5 => rng.pick(EDGES).to_string(),
        6 => "9".repeat(1 + rng.below(400)),
        _ => random_text(rng),
    }
}

/// Values each setting accepts, so that cases get past the first setting
/// often enough to reach the others (and `preflight`).
fn good(setting: &str) -> &'static [&'static str] {
    match setting {
        "listen" | "metrics" => &["127.0.0.1:0", "[::1]:0", "0.0.0.0:8000"],
        "workers" | "count" | "reload_parallel" => &["1", "2", "1024"],
        "worker_queue" => &["1", "64", "4096"],
        "stall_timeout" => &["0", "30s", "24h"],
        "policy" => &["rr", "wrr", "lc", "least-conn", "WRR"],
        "mode" => &["native", "proxy", "shared", "shim", "node"],
        "backlog" => &["1", "4096", "65535"],
        "drain_timeout" | "ready_timeout" => &["1ms", "10s", "0.5", "1440m", "24h"],
        "min_uptime" => &["0", "1s", "24h"],
        "max_conns_per_worker" => &["0", "1", "1000000000000"],
        "max_rss" => &["0", "1M", "512MB", "1024G"],
        "max_conns" => &["1", "1024", "1048576"],
        "proxy_connect_timeout" => &["1ms", "5s", "24h"],
        "proxy_idle_timeout" => &["0", "1ms", "60s", "24h"],
        "stop_signal" => &["SIGQUIT", "term", "15"],
        "weight" => &["1", "3", "10000"],
        "port" => &["1", "8080", "65535"],
        _ => &["x", "lb.sock", "/tmp/lb-fuzz.log"],
    }
}

/// The TOML keys that take an integer.
const INTEGER_KEYS: &[&str] = &[
    "backlog",
    "workers",
    "max_conns_per_worker",
    "reload_parallel",
    "worker_queue",
    "max_conns",
    "count",
    "weight",
    "port",
];

/// A value for `setting` as text: often one it accepts, else an edge.
fn setting_value(rng: &mut Rng, setting: &str) -> String {
    if rng.chance(60) {
        rng.pick(good(setting)).to_string()
    } else {
        value(rng)
    }
}

/// `setting`'s value in lb.toml: mostly of the type the key takes.
fn toml_setting(rng: &mut Rng, setting: &str) -> String {
    if rng.chance(15) {
        return toml_value(rng);
    }
    let v = setting_value(rng, setting);
    if INTEGER_KEYS.contains(&setting) && v.parse::<i64>().is_ok() && rng.chance(90) {
        v
    } else {
        toml_string(&v)
    }
}

/// A TOML value of any type, to exercise type errors as well as range
/// errors.
fn toml_value(rng: &mut Rng) -> String {
    match rng.below(12) {
        0..=4 => toml_string(&value(rng)),
        5 => rng
            .pick(&[
                "0",
                "1",
                "-1",
                "2",
                "1024",
                "1025",
                "10000",
                "10001",
                "65535",
                "65536",
                "4294967295",
                "4294967296",
                "1000000000001",
                "9223372036854775807",
                "-9223372036854775808",
            ])
            .to_string(),
        6 => rng
            .pick(&["1.5", "-0.0", "inf", "nan", "1e300", "0.001"])
            .to_string(),
        7 => rng.pick(&["true", "false"]).to_string(),
        8 => format!("[{}, {}]", toml_string(&value(rng)), toml_value_flat(rng)),
        9 => format!("{{ {} = {} }}", toml_key(rng), toml_value_flat(rng)),
        10 => "1979-05-27T07:32:00Z".into(),
        // Not TOML.
        _ => random_text(rng).replace('\n', " "),
    }
}

fn toml_value_flat(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => toml_string(&value(rng)),
        1 => rng.pick(&["0", "-1", "4294967296"]).to_string(),
        _ => "true".into(),
    }
}

/// A basic TOML string holding `s` exactly.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_key(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => "A".into(),
        1 => "\"A=B\"".into(),
        2 => "\"\"".into(),
        _ => toml_string(&value(rng)),
    }
}

const KEYS: &[&str] = &[
    "listen",
    "backlog",
    "policy",
    "workers",
    "drain_timeout",
    "ready_timeout",
    "min_uptime",
    "worker_log",
    "control",
    "max_conns_per_worker",
    "max_rss",
    "metrics",
    "reload_parallel",
    "worker_queue",
    "stall_timeout",
    "max_conns",
    "proxy_connect_timeout",
    "proxy_idle_timeout",
    "mode",
];

const POOL_KEYS: &[&str] = &[
    "name",
    "args",
    "env",
    "count",
    "weight",
    "mode",
    "port",
    "stop_signal",
];

const COMMANDS: &[&str] = &[
    "sh",
    "/bin/sh",
    "node",
    "no-such-command-xyz",
    "/nonexistent/worker",
    "",
    "/",
    "/tmp",
];

/// An lb.toml: some keys with random values, some pools, and now and
/// then a line of noise, a repeated key or bytes that are not UTF-8.
fn toml_file(rng: &mut Rng) -> Vec<u8> {
    let mut text = String::new();
    for key in KEYS {
        if rng.chance(20) {
            let _ = writeln!(text, "{key} = {}", toml_setting(rng, key));
        }
    }
    if rng.chance(5) {
        let _ = writeln!(text, "{} = 1", rng.pick(KEYS));
    }
    if rng.chance(5) {
        let _ = writeln!(text, "{} = 1", toml_string(&value(rng)));
    }
    for _ in 0..rng.below(4) {
        text.push_str("[[pool]]\n");
        if rng.chance(90) {
            let command = if rng.chance(80) {
                toml_string(rng.pick::<&str>(COMMANDS))
            } else {
                toml_value(rng)
            };
            let _ = writeln!(text, "command = {command}");
        }
        for key in POOL_KEYS {
            if rng.chance(25) {
                let v = match *key {
                    "args" if rng.chance(80) => {
                        format!("[{}]", toml_string(&setting_value(rng, "args")))
                    }
                    "env" if rng.chance(80) => {
                        let name = if rng.chance(60) {
                            "A".into()
                        } else {
                            toml_key(rng)
                        };
                        format!("{{ {name} = {} }}", toml_string(&setting_value(rng, "env")))
                    }
                    "count" | "weight" | "port" if rng.chance(30) => {
                        rng.pick(&["0", "1025", "10001", "65536", "-1"]).to_string()
                    }
                    _ => toml_setting(rng, key),
                };
                let _ = writeln!(text, "{key} = {v}");
            }
        }
    }
    if rng.chance(5) {
        text.push_str(&random_text(rng));
    }
    let mut bytes = text.into_bytes();
    if rng.chance(5) && !bytes.is_empty() {
        let i = rng.below(bytes.len());
        bytes[i] = 0xff;
    }
    bytes
}

const FLAGS: &[&str] = &[
    "--listen",
    "--workers",
    "--policy",
    "--mode",
    "--backlog",
    "--drain-timeout",
    "--ready-timeout",
    "--min-uptime",
    "--worker-log",
    "--max-conns-per-worker",
    "--max-rss",
    "--reload-parallel",
    "--worker-queue",
    "--stall-timeout",
    "--max-conns",
    "--proxy-connect-timeout",
    "--proxy-idle-timeout",
    "--metrics",
    "--control",
];

/// Each variable and the setting it sets.
const VARS: &[(&str, &str)] = &[
    ("LB_LISTEN", "listen"),
    ("LB_WORKERS", "workers"),
    ("SCHED_POLICY", "policy"),
    ("LB_MODE", "mode"),
    ("LB_BACKLOG", "backlog"),
    ("LB_DRAIN_TIMEOUT", "drain_timeout"),
    ("LB_READY_TIMEOUT", "ready_timeout"),
    ("LB_MIN_UPTIME", "min_uptime"),
    ("LB_WORKER_LOG", "worker_log"),
    ("LB_MAX_CONNS_PER_WORKER", "max_conns_per_worker"),
    ("LB_MAX_RSS", "max_rss"),
    ("LB_RELOAD_PARALLEL", "reload_parallel"),
    ("LB_WORKER_QUEUE", "worker_queue"),
    ("LB_STALL_TIMEOUT", "stall_timeout"),
    ("LB_MAX_CONNS", "max_conns"),
    ("LB_PROXY_CONNECT_TIMEOUT", "proxy_connect_timeout"),
    ("LB_PROXY_IDLE_TIMEOUT", "proxy_idle_timeout"),
    ("LB_METRICS", "metrics"),
    ("LB_CONTROL", "control"),
];

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
    for flag in FLAGS {
        if rng.chance(10) {
            // (clap itself refuses an empty value.)
            let v = setting_value(rng, &flag[2..].replace('-', "_"));
            if !v.is_empty() {
                argv.push(format!("{flag}={v}"));
            }
        }
    }
    let mut env: HashMap<String, String> = HashMap::new();
    for (var, setting) in VARS {
        if rng.chance(10) {
            env.insert(var.to_string(), setting_value(rng, setting));
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
    assert!((1..=bounds::BACKLOG_MAX).contains(&c.backlog), "{case:?}");
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
                config.worker_log = rng.pick(&logs).clone();
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
