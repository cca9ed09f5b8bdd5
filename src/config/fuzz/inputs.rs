//! Generators of the fuzz's inputs: random and edge values, TOML values
//! of every type, and whole `lb.toml` files.

use std::fmt::Write as _;

use crate::config::settings::{self, Spec};

/// SplitMix64: tiny, and good enough to pick test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
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
pub fn random_text(rng: &mut Rng) -> String {
    const CHARS: &[char] = &[
        '0', '1', '2', '5', '9', '9', '.', ' ', '-', '+', 's', 'm', 'h', 'k', 'K', 'M', 'G', 'b',
        'B', 'i', 'x', '\n', '\t', '\u{0}', 'é', '💥', '"', '\\', '=', '[', ']', '/',
    ];
    let len = rng.below(24);
    (0..len).map(|_| *rng.pick(CHARS)).collect()
}

pub fn value(rng: &mut Rng) -> String {
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
        "dispatch" => &["master", "auto", "Master", "kernel"],
        "log_format" => &["text", "json", "JSON"],
        "log_timestamps" => &["on", "off", "auto"],
        "min_ready" => &["0", "1", "2"],
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
        // lb's own (accepted whoever runs the test), and root's.
        "user" => own("user"),
        "group" => own("group"),
        "cwd" => &["/", "/tmp", "."],
        "umask" => &["022", "0o027", "0"],
        "max_conns_per_worker_jitter" => &["0"],
        "watch" => &["/tmp", ".", "/tmp,/"],
        _ => &["x", "lb.sock", "/tmp/lb-fuzz.log"],
    }
}

/// `kind`'s good values: this process's own id (by number, and as root
/// also by name).
fn own(kind: &str) -> &'static [&'static str] {
    static IDS: std::sync::OnceLock<[Vec<&'static str>; 2]> = std::sync::OnceLock::new();
    let ids = IDS.get_or_init(|| {
        let leak = |id: u32| &*Box::leak(id.to_string().into_boxed_str());
        let root = nix::unistd::geteuid().is_root();
        let named = |ids: Vec<&'static str>| {
            if root {
                [ids, vec!["root"]].concat()
            } else {
                ids
            }
        };
        [
            named(vec![leak(nix::unistd::geteuid().as_raw())]),
            named(vec![leak(nix::unistd::getegid().as_raw())]),
        ]
    });
    if kind == "user" { &ids[0] } else { &ids[1] }
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
    "max_conns_per_worker_jitter",
];

/// A value for `setting` as text: often one it accepts, else an edge.
pub fn setting_value(rng: &mut Rng, setting: &str) -> String {
    // Names and paths that load looks up: almost any other text is
    // refused, so good ones come more often to keep both sides reached.
    let looked_up = ["user", "group", "cwd", "watch", "umask"].contains(&setting);
    if rng.chance(if looked_up { 85 } else { 60 }) {
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

const POOL_KEYS: &[&str] = &[
    "name",
    "args",
    "env",
    "count",
    "weight",
    "mode",
    "port",
    "stop_signal",
    "user",
    "group",
    "cwd",
    "umask",
];

pub const COMMANDS: &[&str] = &[
    "sh",
    "/bin/sh",
    "node",
    "no-such-command-xyz",
    "/nonexistent/worker",
    "",
    "/",
    "/tmp",
];

/// The settings lb.toml has (all but `config`), from the table.
fn file_settings() -> impl Iterator<Item = &'static Spec> {
    settings::ALL.iter().copied().filter(|s| s.file.is_some())
}

/// An lb.toml: some keys with random values, some pools, and now and
/// then a line of noise, a repeated key or bytes that are not UTF-8.
pub fn toml_file(rng: &mut Rng) -> Vec<u8> {
    let mut text = String::new();
    let keys: Vec<&str> = file_settings().map(|s| s.key).collect();
    for key in &keys {
        if rng.chance(20) {
            let _ = writeln!(text, "{key} = {}", toml_setting(rng, key));
        }
    }
    if rng.chance(5) {
        let _ = writeln!(text, "{} = 1", rng.pick(&keys));
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
