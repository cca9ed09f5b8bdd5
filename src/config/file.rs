//! `lb.toml` as written: every key optional, unknown keys refused. Turned
//! into a validated [`super::Config`] by the merge in `mod.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<super::listen::FileListen>,
    pub backlog: Option<u32>,
    pub policy: Option<String>,
    pub workers: Option<usize>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub drain_timeout: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub ready_timeout: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub min_uptime: Option<String>,
    pub worker_log: Option<String>,
    pub control: Option<String>,
    pub max_conns_per_worker: Option<u64>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub max_rss: Option<String>,
    pub metrics: Option<String>,
    pub reload_parallel: Option<usize>,
    pub worker_queue: Option<usize>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub stall_timeout: Option<String>,
    pub max_conns: Option<usize>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub proxy_connect_timeout: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub proxy_idle_timeout: Option<String>,
    pub proxy_protocol: Option<String>,
    /// One network, or a list of them.
    pub proxy_trusted: Option<Paths>,
    pub proxy_untrusted: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    pub proxy_header_timeout: Option<String>,
    pub send_proxy: Option<String>,
    pub mode: Option<String>,
    pub dispatch: Option<String>,
    pub min_ready: Option<usize>,
    pub log_format: Option<String>,
    pub log_timestamps: Option<String>,
    pub log_file: Option<String>,
    #[serde(default)]
    pub pool: Vec<FilePool>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub cwd: Option<String>,
    pub umask: Option<super::run_as::Octal>,
    pub max_conns_per_worker_jitter: Option<u64>,
    pub watch: Option<Paths>,
}

/// One path (or network), or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

impl Paths {
    /// As `--watch` takes them: comma-separated.
    pub fn joined(&self) -> String {
        match self {
            Paths::One(p) => p.clone(),
            Paths::Many(p) => p.join(","),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub name: Option<String>,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub count: Option<usize>,
    pub weight: Option<u32>,
    pub mode: Option<String>,
    pub port: Option<u16>,
    pub send_proxy: Option<String>,
    pub stop_signal: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub cwd: Option<String>,
    pub umask: Option<super::run_as::Octal>,
}

/// A duration or size written as text (`"10s"`, `"512MB"`) or as a bare
/// TOML number (`drain_timeout = 5`, seconds; `max_rss = 1048576`, bytes):
/// the number as its text, for the setting's own parser to read.
fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string like \"10s\" or \"512MB\", or a number")
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            // Negative: the setting's parser refuses it with its range.
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(Text)
}

/// Reads and parses `path`; errors name the file and line, on one line.
pub fn load(path: &Path) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(&text).map_err(|(line, message)| ConfigError::Syntax {
        path: path.display().to_string(),
        line,
        message,
    })
}

/// Parses file text; on error gives the 1-based line and a one-line message.
pub fn parse(text: &str) -> Result<File, (usize, String)> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            // Bytes, not `str`: a span that ends inside a character must
            // not panic.
            .map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(1);
        let message = e.message().lines().next().unwrap_or("").trim().to_string();
        (line, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses() {
        let f = parse(include_str!("../../lb.toml.example")).expect("lb.toml.example parses");
        assert_eq!(f.pool.len(), 2);
    }

    #[test]
    fn full_file_parses() {
        let f = parse(
            r#"
listen = "127.0.0.1:9000"
policy = "wrr"
backlog = 128
drain_timeout = "5s"

[[pool]]
name = "main"
command = "python3"
args = ["app.py"]
env = { MODE = "prod" }
count = 3
weight = 3

[[pool]]
name = "canary"
command = "python3"
args = ["app.py"]
count = 1
weight = 1
"#,
        )
        .unwrap();
        assert_eq!(f.pool.len(), 2);
        assert_eq!(f.pool[0].env["MODE"], "prod");
        assert_eq!(f.pool[1].weight, Some(1));
    }

    #[test]
    fn durations_and_sizes_may_be_bare_numbers() {
        let f = parse("drain_timeout = 5\nmin_uptime = 0.5\nmax_rss = 1048576\n").unwrap();
        assert_eq!(f.drain_timeout.as_deref(), Some("5"));
        assert_eq!(f.min_uptime.as_deref(), Some("0.5"));
        assert_eq!(f.max_rss.as_deref(), Some("1048576"));
        assert_eq!(parse("").unwrap().drain_timeout, None);
        let (line, msg) = parse("\ndrain_timeout = true\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("a string like \"10s\""), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let (line, msg) = parse("listen = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("lisen"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn unknown_pool_key_and_wrong_type_are_refused() {
        let (line, msg) = parse("[[pool]]\ncommand = \"x\"\ncout = 2\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(msg.contains("cout"), "{msg}");
        let (_, msg) = parse("workers = \"four\"\n").unwrap_err();
        assert!(
            msg.contains("integer") || msg.contains("invalid type"),
            "{msg}"
        );
    }
}
