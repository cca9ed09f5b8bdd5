//! One validated [`Config`] from the command line, the environment and
//! `lb.toml`, merged with precedence CLI > env > file > default.
//!
//! Every refusal is one line naming the value, where it came from, and the
//! fix. [`load`] does no I/O beyond reading the file and checking that
//! worker commands exist; [`preflight`], run once at start, checks what the
//! configuration names (files, the open-files limit).

pub mod duration;
mod file;
#[cfg(test)]
mod fuzz;
mod mode;
mod preflight;
pub mod size;

pub use preflight::preflight;

pub use mode::{ChannelKind, DrainBy, Mode};

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::StartArgs;
use crate::policy::PolicyKind;

/// Defaults, in one place (documented in `lb.toml.example`).
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:8000";
    pub const BACKLOG: u32 = 4096;
    pub const DRAIN_TIMEOUT: &str = "10s";
    pub const READY_TIMEOUT: &str = "30s";
    pub const MIN_UPTIME: &str = "1s";
    pub const WEIGHT: u32 = 1;
    /// Most workers one master runs (the slot arrays are sized up front).
    pub const MAX_WORKERS: usize = 1024;
    /// Proxy mode: relays open at once (each holds two sockets and two pipes).
    pub const MAX_CONNS: usize = 1024;
    /// Connections that may wait in one worker's channel.
    pub const WORKER_QUEUE: usize = 64;
    pub const STALL_TIMEOUT: &str = "30s";
    /// Proxy mode: a connect to a worker not done by then is refused
    /// (HAProxy's usual `timeout connect 5s`).
    pub const PROXY_CONNECT_TIMEOUT: &str = "5s";
    /// Proxy mode: a relay that moved no byte either way for this long is
    /// reset.
    pub const PROXY_IDLE_TIMEOUT: &str = "60s";
}

/// The range each setting must fall in (documented in `lb.toml.example` and
/// `--help`). With every duration at most a day, no deadline lb computes
/// (`Instant::now() + timeout`) can overflow.
pub mod bounds {
    use std::time::Duration;

    /// The longest duration any setting takes: a day.
    pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
    /// The shortest `drain_timeout` and `ready_timeout`: 0 would kill every
    /// starting (or draining) worker at once.
    pub const TIMEOUT_MIN: Duration = Duration::from_millis(1);
    /// The kernel's own historic ceiling (and `net.core.somaxconn` caps it).
    pub const BACKLOG_MAX: u32 = 65535;
    /// Proxy mode's relays (each costs 6 open files; see `preflight`).
    pub const MAX_CONNS_MAX: usize = 1 << 20;
    /// `max_conns_per_worker` (0 = no limit): a trillion.
    pub const CONNS_PER_WORKER_MAX: u64 = 1_000_000_000_000;
    /// `max_rss` (0 = no limit): from 1 MiB (a bare number is bytes: `512`
    /// is almost surely a mistake for 512MB) to 1 TiB.
    pub const RSS_MIN: u64 = 1 << 20;
    pub const RSS_MAX: u64 = 1 << 40;
    /// A pool's weight: 10000:1 still lets a canary take 0.01%.
    pub const WEIGHT_MAX: u32 = 10_000;
    /// `worker_queue`: the kernel's smallest send buffer already holds a
    /// few; 4096 is far beyond any worker's useful backlog.
    pub const WORKER_QUEUE_MAX: usize = 4096;
}

/// Everything the master needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub backlog: u32,
    pub policy: PolicyKind,
    pub drain_timeout: Duration,
    pub ready_timeout: Duration,
    pub min_uptime: Duration,
    /// Where workers' output lines go; `None` = lb's stderr.
    pub worker_log: Option<PathBuf>,
    /// The control socket; `None` = `control::path::server_default(port)`.
    pub control: Option<PathBuf>,
    /// Replace a worker (new one ready first) after this many connections.
    pub max_conns_per_worker: Option<u64>,
    /// Replace a worker (new one ready first) whose RSS exceeds this.
    pub max_rss: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    pub metrics: Option<SocketAddr>,
    /// How many slots a rolling reload replaces at once.
    pub reload_parallel: usize,
    /// Connections that may wait in one worker's channel (native, shim).
    pub worker_queue: usize,
    /// Replace a worker that takes none of its waiting connections for this
    /// long; `None` = never.
    pub stall_timeout: Option<Duration>,
    /// Proxy mode: connections relayed at once (the relay slab's size).
    pub max_conns: usize,
    /// Proxy mode: a connect to a worker not done by then is refused (the
    /// client goes to another worker).
    pub proxy_connect_timeout: Duration,
    /// Proxy mode: a relay that moved no byte either way for this long is
    /// reset; `None`: never.
    pub proxy_idle_timeout: Option<Duration>,
    pub pools: Vec<Pool>,
    /// The policy was chosen (flag, env or file) rather than defaulted.
    pub policy_explicit: bool,
    /// Where the values [`preflight`] checks came from, for its messages.
    pub origins: Origins,
}

/// Where some values came from (their flag with [`Origin::Default`] when
/// not set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    pub worker_log: Origin,
    pub control: Origin,
    pub max_conns: Origin,
}

/// A group of identical workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    /// The executable, resolved against `PATH`.
    pub command: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub count: usize,
    pub weight: u32,
    pub mode: Mode,
    /// Shim mode: the port the server binds (taken over); `None` = lb's own.
    pub port: Option<u16>,
    /// How a server that does not know lb is asked to stop gracefully
    /// (shim, proxy, shared): SIGTERM unless the pool says otherwise
    /// (nginx: SIGQUIT).
    pub stop_signal: i32,
}

impl Config {
    /// Whether lb never accepts: every pool is shared (modes are not mixed
    /// with shared, see `load`), and the workers accept from the listener.
    pub fn shared(&self) -> bool {
        !self.pools.iter().any(|p| p.mode.dispatched())
    }

    /// Whether some pool's connections are relayed (the dispatcher then
    /// needs its relays).
    pub fn relays(&self) -> bool {
        self.pools.iter().any(|p| p.mode.relays())
    }

    /// Whether some pool runs Node.js cluster workers.
    pub fn any_node(&self) -> bool {
        self.pools.iter().any(|p| p.mode == Mode::Node)
    }

    /// Total number of worker slots.
    pub fn slots(&self) -> usize {
        self.pools.iter().map(|p| p.count).sum()
    }

    /// The pool each slot belongs to, slot by slot.
    pub fn slot_pools(&self) -> Vec<usize> {
        self.pools
            .iter()
            .enumerate()
            .flat_map(|(i, p)| std::iter::repeat_n(i, p.count))
            .collect()
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File(String, &'static str),
    /// Not set: the default of this flag.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "{flag}"),
            Origin::Env(var) => write!(f, "{var}"),
            Origin::File(path, key) => write!(f, "`{key}` in {path}"),
            Origin::Default(flag) => write!(f, "{flag} (default)"),
        }
    }
}

/// A refusal. Its `Display` is always one line: control characters in the
/// values it quotes (a newline in a path, say) are shown escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Read {
        path: String,
        reason: String,
    },
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    Invalid {
        origin: Origin,
        value: String,
        expected: String,
    },
    Command {
        origin: String,
        command: String,
        reason: &'static str,
    },
    Script {
        origin: String,
        command: String,
        reason: &'static str,
    },
    Conflict(String),
}

impl ConfigError {
    fn message(&self) -> String {
        match self {
            ConfigError::Read { path, reason } => {
                format!("cannot read config file {path}: {reason}; check --config / LB_CONFIG")
            }
            ConfigError::Syntax {
                path,
                line,
                message,
            } => format!("{path}:{line}: {message}; see lb.toml.example for every key"),
            ConfigError::Invalid {
                origin,
                value,
                expected,
            } => format!("invalid {origin} `{value}`: {expected}"),
            ConfigError::Command {
                origin,
                command,
                reason,
            } => format!(
                "worker command `{command}` ({origin}) {reason}; give the path of an executable \
                 or fix PATH"
            ),
            ConfigError::Script {
                origin,
                command,
                reason,
            } => format!(
                "worker command `{command}` ({origin}) {reason}; a Node.js cluster worker runs a \
                 script: node app.js"
            ),
            ConfigError::Conflict(message) => message.clone(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.message().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads the environment through a function, so tests need not mutate the
/// process's own.
pub type EnvFn<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The first of CLI, env, file that is set, with its origin.
fn layered(
    cli: Option<&str>,
    flag: &'static str,
    env: EnvFn<'_>,
    var: &'static str,
    file: Option<String>,
    file_origin: impl FnOnce() -> Origin,
) -> Option<(String, Origin)> {
    if let Some(v) = cli {
        return Some((v.to_string(), Origin::Flag(flag)));
    }
    if let Some(v) = env(var).filter(|v| !v.is_empty()) {
        return Some((v, Origin::Env(var)));
    }
    file.map(|v| (v, file_origin()))
}

fn invalid(origin: Origin, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn parse_count(value: &str, origin: Origin) -> Result<usize, ConfigError> {
    whole_number(value, origin, defaults::MAX_WORKERS, "")
}

/// A whole number from 1 to `max`, or the one-line error that says so
/// (`note` follows the range).
fn whole_number<T>(value: &str, origin: Origin, max: T, note: &str) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + From<u8> + std::fmt::Display + Copy,
{
    match value.trim().parse::<T>() {
        Ok(n) if (T::from(1)..=max).contains(&n) => Ok(n),
        _ => Err(invalid(
            origin,
            value,
            format!("give a whole number from 1 to {max}{note}"),
        )),
    }
}

/// The CPUs this process may run on: affinity mask and cgroup quota aware
/// (that is what `available_parallelism` reads on Linux).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Merges and validates. `env` looks up environment variables.
pub fn load(args: &StartArgs, env: EnvFn<'_>) -> Result<Config, ConfigError> {
    let path = args.config.clone().or_else(|| {
        env("LB_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let file = match &path {
        Some(p) => file::load(p)?,
        None => file::File::default(),
    };
    let path_text = path
        .as_ref()
        .map_or_else(|| "lb.toml".to_string(), |p| p.display().to_string());
    let in_file = |key: &'static str| Origin::File(path_text.clone(), key);

    let (listen_text, listen_origin) = layered(
        args.listen.as_deref(),
        "--listen",
        env,
        "LB_LISTEN",
        file.listen.clone(),
        || in_file("listen"),
    )
    .unwrap_or((defaults::LISTEN.to_string(), Origin::Flag("--listen")));
    let listen = listen_text
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            invalid(
                listen_origin,
                &listen_text,
                "give HOST:PORT, e.g. 127.0.0.1:8000 or 0.0.0.0:80",
            )
        })?;

    let backlog = match layered(
        args.backlog.as_deref(),
        "--backlog",
        env,
        "LB_BACKLOG",
        file.backlog.map(|b| b.to_string()),
        || in_file("backlog"),
    ) {
        None => defaults::BACKLOG,
        Some((v, origin)) => whole_number(&v, origin, bounds::BACKLOG_MAX, "")?,
    };

    let policy_choice = layered(
        args.policy.as_deref(),
        "--policy",
        env,
        "SCHED_POLICY",
        file.policy.clone(),
        || in_file("policy"),
    );
    let policy_explicit = policy_choice.is_some();
    let policy = match policy_choice {
        None => PolicyKind::RoundRobin,
        Some((v, origin)) => v.parse::<PolicyKind>().map_err(|_| {
            invalid(
                origin,
                &v,
                "use rr (round-robin), wrr (weighted) or lc (least-conn)",
            )
        })?,
    };

    // Set on the command line or in the environment, the mode applies to
    // every pool; in the file, `mode` is the default for pools without one.
    let mode = match layered(
        args.mode.as_deref(),
        "--mode",
        env,
        "LB_MODE",
        file.mode.clone(),
        || in_file("mode"),
    ) {
        None => None,
        Some((v, origin)) => Some((
            Mode::parse(&v).ok_or_else(|| invalid(origin.clone(), &v, Mode::CHOICES))?,
            origin,
        )),
    };

    // Bounded here, so that no deadline computed from them can overflow.
    let duration = |cli: Option<&str>,
                    flag: &'static str,
                    var: &'static str,
                    file: Option<String>,
                    key: &'static str,
                    default: &str,
                    min: Duration|
     -> Result<Duration, ConfigError> {
        let (v, origin) = layered(cli, flag, env, var, file, || in_file(key))
            .unwrap_or((default.to_string(), Origin::Flag(flag)));
        duration::parse(&v)
            .filter(|d| (min..=bounds::DURATION_MAX).contains(d))
            .ok_or_else(|| {
                invalid(
                    origin,
                    &v,
                    format!(
                        "give a duration from {} to {}, like 500ms, 10s or 2m",
                        duration::show(min),
                        duration::show(bounds::DURATION_MAX)
                    ),
                )
            })
    };
    let drain_timeout = duration(
        args.drain_timeout.as_deref(),
        "--drain-timeout",
        "LB_DRAIN_TIMEOUT",
        file.drain_timeout.clone(),
        "drain_timeout",
        defaults::DRAIN_TIMEOUT,
        bounds::TIMEOUT_MIN,
    )?;
    let ready_timeout = duration(
        args.ready_timeout.as_deref(),
        "--ready-timeout",
        "LB_READY_TIMEOUT",
        file.ready_timeout.clone(),
        "ready_timeout",
        defaults::READY_TIMEOUT,
        bounds::TIMEOUT_MIN,
    )?;
    // 0 is meaningful here: every exit of a worker that was ready resets
    // the backoff.
    let min_uptime = duration(
        args.min_uptime.as_deref(),
        "--min-uptime",
        "LB_MIN_UPTIME",
        file.min_uptime.clone(),
        "min_uptime",
        defaults::MIN_UPTIME,
        Duration::ZERO,
    )?;
    let path_setting = |cli: Option<&PathBuf>,
                        flag: &'static str,
                        var: &'static str,
                        file: Option<&String>,
                        key: &'static str|
     -> (Option<PathBuf>, Origin) {
        if let Some(p) = cli {
            return (Some(p.clone()), Origin::Flag(flag));
        }
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            return (Some(v.into()), Origin::Env(var));
        }
        match file {
            Some(v) => (Some(v.into()), in_file(key)),
            None => (None, Origin::Default(flag)),
        }
    };
    let (worker_log, worker_log_origin) = path_setting(
        args.worker_log.as_ref(),
        "--worker-log",
        "LB_WORKER_LOG",
        file.worker_log.as_ref(),
        "worker_log",
    );
    let max_conns_per_worker = match layered(
        args.max_conns_per_worker.as_deref(),
        "--max-conns-per-worker",
        env,
        "LB_MAX_CONNS_PER_WORKER",
        file.max_conns_per_worker.map(|n| n.to_string()),
        || in_file("max_conns_per_worker"),
    ) {
        None => None,
        Some((v, origin)) => match v.trim().parse::<u64>() {
            Ok(0) => None,
            Ok(n) if n <= bounds::CONNS_PER_WORKER_MAX => Some(n),
            _ => {
                return Err(invalid(
                    origin,
                    &v,
                    format!(
                        "give a whole number up to {} (0 = no limit)",
                        bounds::CONNS_PER_WORKER_MAX
                    ),
                ));
            }
        },
    };
    let max_rss = match layered(
        args.max_rss.as_deref(),
        "--max-rss",
        env,
        "LB_MAX_RSS",
        file.max_rss.clone(),
        || in_file("max_rss"),
    ) {
        None => None,
        Some((v, origin)) => match size::parse(&v) {
            Some(0) => None,
            Some(n) if (bounds::RSS_MIN..=bounds::RSS_MAX).contains(&n) => Some(n),
            _ => {
                return Err(invalid(
                    origin,
                    &v,
                    format!(
                        "give a size from {} to {}, like 512MB or 1G (0 = no limit)",
                        size::show(bounds::RSS_MIN),
                        size::show(bounds::RSS_MAX)
                    ),
                ));
            }
        },
    };
    let reload_parallel = match layered(
        args.reload_parallel.as_deref(),
        "--reload-parallel",
        env,
        "LB_RELOAD_PARALLEL",
        file.reload_parallel.map(|n| n.to_string()),
        || in_file("reload_parallel"),
    ) {
        None => 1,
        Some((v, origin)) => parse_count(&v, origin)?,
    };
    let worker_queue = match layered(
        args.worker_queue.as_deref(),
        "--worker-queue",
        env,
        "LB_WORKER_QUEUE",
        file.worker_queue.map(|n| n.to_string()),
        || in_file("worker_queue"),
    ) {
        None => defaults::WORKER_QUEUE,
        Some((v, origin)) => whole_number(&v, origin, bounds::WORKER_QUEUE_MAX, "")?,
    };
    let stall_timeout = Some(duration(
        args.stall_timeout.as_deref(),
        "--stall-timeout",
        "LB_STALL_TIMEOUT",
        file.stall_timeout.clone(),
        "stall_timeout",
        defaults::STALL_TIMEOUT,
        Duration::ZERO,
    )?)
    .filter(|d| !d.is_zero());
    let (max_conns, max_conns_origin) = match layered(
        args.max_conns.as_deref(),
        "--max-conns",
        env,
        "LB_MAX_CONNS",
        file.max_conns.map(|n| n.to_string()),
        || in_file("max_conns"),
    ) {
        None => (defaults::MAX_CONNS, Origin::Default("--max-conns")),
        Some((v, origin)) => (
            whole_number(
                &v,
                origin.clone(),
                bounds::MAX_CONNS_MAX,
                " (each relay costs 6 open files)",
            )?,
            origin,
        ),
    };
    // 0 would refuse every connect; the kernel gives up on its own after
    // its SYN retries (about 2 minutes), so there is no "off" to offer.
    let proxy_connect_timeout = duration(
        args.proxy_connect_timeout.as_deref(),
        "--proxy-connect-timeout",
        "LB_PROXY_CONNECT_TIMEOUT",
        file.proxy_connect_timeout.clone(),
        "proxy_connect_timeout",
        defaults::PROXY_CONNECT_TIMEOUT,
        bounds::TIMEOUT_MIN,
    )?;
    // 0 is off: long-lived quiet connections (a database's pool) are a
    // normal thing to relay.
    let proxy_idle_timeout = {
        let (v, origin) = layered(
            args.proxy_idle_timeout.as_deref(),
            "--proxy-idle-timeout",
            env,
            "LB_PROXY_IDLE_TIMEOUT",
            file.proxy_idle_timeout.clone(),
            || in_file("proxy_idle_timeout"),
        )
        .unwrap_or((
            defaults::PROXY_IDLE_TIMEOUT.to_string(),
            Origin::Flag("--proxy-idle-timeout"),
        ));
        match duration::parse(&v) {
            Some(d) if d.is_zero() => None,
            Some(d) if (bounds::TIMEOUT_MIN..=bounds::DURATION_MAX).contains(&d) => Some(d),
            _ => {
                return Err(invalid(
                    origin,
                    &v,
                    format!(
                        "give a duration from {} to {}, like 500ms, 10s or 2m (0 = off)",
                        duration::show(bounds::TIMEOUT_MIN),
                        duration::show(bounds::DURATION_MAX)
                    ),
                ));
            }
        }
    };
    let metrics = match layered(
        args.metrics.as_deref(),
        "--metrics",
        env,
        "LB_METRICS",
        file.metrics.clone(),
        || in_file("metrics"),
    ) {
        None => None,
        Some((v, origin)) => Some(
            v.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| invalid(origin, &v, "give HOST:PORT, e.g. 127.0.0.1:9090"))?,
        ),
    };
    let (control, control_origin) = path_setting(
        args.control.as_ref(),
        "--control",
        "LB_CONTROL",
        file.control.as_ref(),
        "control",
    );

    // Worker count given outside the pools (CLI > env > file `workers`).
    let workers = layered(
        args.workers.as_deref(),
        "--workers",
        env,
        "LB_WORKERS",
        file.workers.map(|w| w.to_string()),
        || in_file("workers"),
    );
    let workers = match workers {
        Some((v, origin)) => Some((parse_count(&v, origin.clone())?, origin)),
        None => None,
    };
    let path_var = env("PATH");

    let pools = if !args.command.is_empty() {
        // A command on the command line replaces the file's pools.
        let (program, rest) = args.command.split_first().expect("non-empty");
        let command =
            resolve(program, path_var.as_deref()).map_err(|reason| ConfigError::Command {
                origin: "after --".into(),
                command: program.to_string_lossy().into_owned(),
                reason,
            })?;
        let mode = mode
            .as_ref()
            .map_or_else(|| Mode::detect(&command), |m| m.0);
        mode.check_args(rest)
            .map_err(|reason| ConfigError::Script {
                origin: "after --".into(),
                command: describe(program, rest),
                reason,
            })?;
        vec![Pool {
            name: "main".into(),
            command,
            args: rest.to_vec(),
            env: Vec::new(),
            count: workers.as_ref().map_or_else(available_cpus, |w| w.0),
            weight: defaults::WEIGHT,
            mode,
            port: None,
            stop_signal: libc::SIGTERM,
        }]
    } else if file.pool.is_empty() {
        let exe = std::env::current_exe().map_err(|e| ConfigError::Command {
            origin: "bundled hello worker".into(),
            command: "lb".into(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "was not found"
            } else {
                "cannot be located"
            },
        })?;
        vec![Pool {
            name: "hello".into(),
            command: exe,
            args: vec!["hello-worker".into()],
            env: Vec::new(),
            count: workers.as_ref().map_or_else(available_cpus, |w| w.0),
            weight: defaults::WEIGHT,
            mode: Mode::Native,
            port: None,
            stop_signal: libc::SIGTERM,
        }]
    } else {
        let several = file.pool.len() > 1;
        if let Some((_, origin @ (Origin::Flag(_) | Origin::Env(_)))) = &workers
            && several
        {
            return Err(ConfigError::Conflict(format!(
                "{origin} sets the size of a single pool, but {path_text} defines {} pools; \
                 set `count` in each [[pool]] instead",
                file.pool.len()
            )));
        }
        let mut pools = Vec::with_capacity(file.pool.len());
        for (i, p) in file.pool.iter().enumerate() {
            let name = p.name.clone().unwrap_or_else(|| format!("pool{i}"));
            let key = |k: &'static str| in_file(k);
            let count = match (&workers, p.count) {
                (Some((n, Origin::Flag(_) | Origin::Env(_))), _) => *n,
                (_, Some(c)) => parse_count(&c.to_string(), key("count"))?,
                (Some((n, _)), None) => *n,
                (None, None) => available_cpus(),
            };
            let weight = p.weight.unwrap_or(defaults::WEIGHT);
            if !(1..=bounds::WEIGHT_MAX).contains(&weight) {
                return Err(invalid(
                    key("weight"),
                    &weight.to_string(),
                    format!("give a pool's weight from 1 to {}", bounds::WEIGHT_MAX),
                ));
            }
            if p.port == Some(0) {
                return Err(invalid(
                    key("port"),
                    "0",
                    "give the port the server binds, from 1 to 65535 (or leave it out for lb's own)",
                ));
            }
            let command =
                resolve(OsStr::new(&p.command), path_var.as_deref()).map_err(|reason| {
                    ConfigError::Command {
                        origin: format!("pool `{name}` in {path_text}"),
                        command: p.command.clone(),
                        reason,
                    }
                })?;
            // No process can be given these: every start would fail.
            if let Some(arg) = p.args.iter().find(|a| a.contains('\0')) {
                return Err(invalid(
                    key("args"),
                    arg,
                    "an argument cannot contain a NUL character",
                ));
            }
            if let Some((k, v)) = p
                .env
                .iter()
                .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
            {
                return Err(invalid(
                    key("env"),
                    &format!("{k}={v}"),
                    "give variables as NAME = \"value\": a name that is not empty and has no `=`, \
                     no NUL character in either",
                ));
            }
            let args: Vec<OsString> = p.args.iter().map(OsString::from).collect();
            let mode = match (&mode, &p.mode) {
                (Some((m, Origin::Flag(_) | Origin::Env(_))), _) => *m,
                (_, Some(text)) => {
                    Mode::parse(text).ok_or_else(|| invalid(key("mode"), text, Mode::CHOICES))?
                }
                (Some((m, _)), None) => *m,
                (None, None) => Mode::detect(&command),
            };
            mode.check_args(&args)
                .map_err(|reason| ConfigError::Script {
                    origin: format!("pool `{name}` in {path_text}"),
                    command: describe(OsStr::new(&p.command), &args),
                    reason,
                })?;
            pools.push(Pool {
                name,
                command,
                args,
                env: p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                count,
                weight,
                mode,
                port: p.port,
                stop_signal: match &p.stop_signal {
                    None => libc::SIGTERM,
                    Some(name) => parse_signal(name).ok_or_else(|| {
                        invalid(
                            key("stop_signal"),
                            name,
                            "give a signal name like SIGTERM, SIGQUIT or SIGINT",
                        )
                    })?,
                },
            });
        }
        pools
    };

    for p in &pools {
        if p.mode == Mode::Shim
            && let Some(reason) = crate::shim::unsupported(&p.command)
        {
            return Err(ConfigError::Conflict(format!(
                "pool `{}`: `{}` {reason}; shim mode cannot work with it: use mode proxy (it \
                 listens on a port of its own, given as {{port}} or PORT), or mode shared if it \
                 can accept from an inherited listener (LISTEN_FDS)",
                p.name,
                p.command.display()
            )));
        }
    }
    if pools.iter().any(|p| !p.mode.dispatched()) && pools.iter().any(|p| p.mode.dispatched()) {
        return Err(ConfigError::Conflict(
            "mode shared cannot be mixed with other modes: shared workers accept from lb's \
             listener themselves, so lb could not also hand connections out; give every pool \
             mode shared, or none"
                .into(),
        ));
    }

    let config = Config {
        listen,
        backlog,
        policy,
        drain_timeout,
        ready_timeout,
        min_uptime,
        worker_log,
        control,
        max_conns_per_worker,
        max_rss,
        metrics,
        reload_parallel,
        worker_queue,
        stall_timeout,
        max_conns,
        proxy_connect_timeout,
        proxy_idle_timeout,
        pools,
        policy_explicit,
        origins: Origins {
            worker_log: worker_log_origin,
            control: control_origin,
            max_conns: max_conns_origin,
        },
    };
    if config.slots() > defaults::MAX_WORKERS {
        return Err(ConfigError::Conflict(format!(
            "{} workers in all is more than the {} one master runs; lower the pools' `count`",
            config.slots(),
            defaults::MAX_WORKERS
        )));
    }
    Ok(config)
}

/// `SIGQUIT`, `quit` or `3` → the signal's number (catchable ones only).
fn parse_signal(text: &str) -> Option<i32> {
    let t = text.trim();
    let signal = match t.parse::<i32>() {
        Ok(n) => nix::sys::signal::Signal::try_from(n).ok()?,
        Err(_) => {
            let upper = t.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<nix::sys::signal::Signal>().ok()?
        }
    };
    use nix::sys::signal::Signal::{SIGKILL, SIGSTOP};
    (signal != SIGKILL && signal != SIGSTOP).then_some(signal as i32)
}

/// `program args…`, for messages.
fn describe(program: &OsStr, args: &[OsString]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Finds `program` the way `execvp` would: as given if it has a `/`, else in
/// each `PATH` directory. The result must be an executable regular file.
fn resolve(program: &OsStr, path_var: Option<&str>) -> Result<PathBuf, &'static str> {
    fn executable(p: &Path) -> Option<bool> {
        let meta = std::fs::metadata(p).ok()?;
        Some(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    }
    if program.is_empty() {
        return Err("is empty");
    }
    let as_path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return match executable(as_path) {
            Some(true) => Ok(as_path.to_path_buf()),
            Some(false) => Err("is not an executable file"),
            None => Err("does not exist"),
        };
    }
    let mut found_non_exec = false;
    for dir in path_var
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
    {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        match executable(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => found_non_exec = true,
            None => {}
        }
    }
    Err(if found_non_exec {
        "is in PATH but not executable"
    } else {
        "was not found in PATH"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args(v: &[&str]) -> StartArgs {
        use clap::Parser;
        crate::cli::Cli::try_parse_from(std::iter::once("lb").chain(v.iter().copied()))
            .unwrap()
            .start
    }

    fn with_env(a: &StartArgs, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([(
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_default(),
            )])
            .collect();
        load(a, &|k| map.get(k).cloned())
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_run_the_bundled_worker_on_every_cpu() {
        let c = with_env(&args(&[]), &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(c.policy, PolicyKind::RoundRobin);
        assert_eq!(c.backlog, defaults::BACKLOG);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.ready_timeout, Duration::from_secs(30));
        assert_eq!(c.min_uptime, Duration::from_secs(1));
        assert_eq!(c.worker_log, None);
        assert_eq!(c.proxy_connect_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy_idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].args, ["hello-worker"]);
        assert_eq!(c.slots(), available_cpus());
    }

    #[test]
    fn cli_beats_env_beats_file() {
        let f = temp_file(
            "prec.toml",
            "policy = \"lc\"\nlisten = \"127.0.0.1:7000\"\nworkers = 3\n",
        );
        let f = f.to_str().unwrap();
        let c = with_env(&args(&["-c", f]), &[]).unwrap();
        assert_eq!(
            (c.policy, c.listen.port(), c.slots()),
            (PolicyKind::LeastConn, 7000, 3)
        );
        let c = with_env(
            &args(&["-c", f]),
            &[("SCHED_POLICY", "WRR"), ("LB_WORKERS", "2")],
        )
        .unwrap();
        assert_eq!((c.policy, c.slots()), (PolicyKind::Weighted, 2));
        let c = with_env(
            &args(&["-c", f, "--policy", "rr", "-w", "5"]),
            &[("SCHED_POLICY", "wrr"), ("LB_WORKERS", "2")],
        )
        .unwrap();
        assert_eq!((c.policy, c.slots()), (PolicyKind::RoundRobin, 5));
    }

    #[test]
    fn bad_values_name_their_origin_on_one_line() {
        let e = with_env(&args(&[]), &[("SCHED_POLICY", "fastest")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SCHED_POLICY") && e.contains("fastest") && e.contains("rr"),
            "{e}"
        );
        let e = with_env(&args(&["-w", "0"]), &[]).unwrap_err().to_string();
        assert!(e.contains("--workers") && e.contains("`0`"), "{e}");
        let e = with_env(&args(&["-l", "nonsense"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--listen") && e.contains("HOST:PORT"), "{e}");
        let e = with_env(&args(&["--drain-timeout", "soon"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--drain-timeout") && !e.contains('\n'), "{e}");
        let e = with_env(&args(&[]), &[("LB_READY_TIMEOUT", "forever")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LB_READY_TIMEOUT"), "{e}");
        let e = with_env(&args(&["--max-rss", "huge"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-rss") && e.contains("512MB"), "{e}");
        let c = with_env(
            &args(&[]),
            &[("LB_MAX_RSS", "64M"), ("LB_MAX_CONNS_PER_WORKER", "1000")],
        )
        .unwrap();
        assert_eq!(
            (c.max_rss, c.max_conns_per_worker),
            (Some(64 << 20), Some(1000))
        );
        let e = with_env(&args(&["--backlog", "many"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--backlog"), "{e}");
    }

    /// The first value of each pair is accepted, the second refused with
    /// one line naming the flag, the value and the range.
    #[test]
    fn every_setting_is_bounded() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("--ready-timeout", "1ms", "0s", "from 1ms to 24h"),
            ("--ready-timeout", "24h", "86400.001", "from 1ms to 24h"),
            ("--ready-timeout", "1440m", "9223372036854775807s", "to 24h"),
            ("--drain-timeout", "86400", "0", "from 1ms to 24h"),
            ("--drain-timeout", "0.001", "2562047788015215h", "to 24h"),
            ("--min-uptime", "0", "25h", "from 0 to 24h"),
            ("--backlog", "65535", "65536", "from 1 to 65535"),
            ("--backlog", "1", "0", "from 1 to 65535"),
            (
                "--max-conns-per-worker",
                "1000000000000",
                "1000000000001",
                "up to 1000000000000",
            ),
            ("--max-rss", "1M", "1023K", "from 1M to 1024G"),
            ("--max-rss", "1024G", "1025G", "from 1M to 1024G"),
            ("--max-conns", "1048576", "1048577", "from 1 to 1048576"),
            ("--reload-parallel", "1024", "1025", "from 1 to 1024"),
            ("--workers", "1", "0", "from 1 to 1024"),
            ("--proxy-connect-timeout", "1ms", "0", "from 1ms to 24h"),
            ("--proxy-connect-timeout", "24h", "25h", "from 1ms to 24h"),
            ("--proxy-idle-timeout", "1ms", "0.5ms", "from 1ms to 24h"),
            ("--proxy-idle-timeout", "24h", "86401", "(0 = off)"),
            ("--proxy-idle-timeout", "0", "never", "(0 = off)"),
        ];
        for &(flag, good, bad, range) in cases {
            assert!(
                with_env(&args(&[flag, good]), &[]).is_ok(),
                "{flag} {good} is accepted"
            );
            let e = with_env(&args(&[flag, bad]), &[]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid {flag} `{bad}`: ")) && e.contains(range),
                "{flag} {bad}: {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let c = with_env(&args(&["--max-rss", "0", "--min-uptime", "0s"]), &[]).unwrap();
        assert_eq!((c.max_rss, c.min_uptime), (None, Duration::ZERO));
        let c = with_env(
            &args(&["--proxy-idle-timeout", "0s"]),
            &[("LB_PROXY_CONNECT_TIMEOUT", "250ms")],
        )
        .unwrap();
        assert_eq!(
            (c.proxy_idle_timeout, c.proxy_connect_timeout),
            (None, Duration::from_millis(250))
        );
        let f = temp_file(
            "proxy-timeouts.toml",
            "proxy_connect_timeout = \"2s\"\nproxy_idle_timeout = \"10m\"\n",
        );
        let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
        assert_eq!(
            (c.proxy_connect_timeout, c.proxy_idle_timeout),
            (Duration::from_secs(2), Some(Duration::from_secs(600)))
        );
        let e = with_env(&args(&[]), &[("LB_READY_TIMEOUT", "0ms")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid LB_READY_TIMEOUT `0ms`"), "{e}");
    }

    #[test]
    fn pool_weights_ports_args_and_env_are_bounded() {
        let pool = |extra: &str| {
            let f = temp_file(
                "pool-bounds.toml",
                &format!("[[pool]]\ncommand = \"sh\"\n{extra}\n"),
            );
            with_env(&args(&["-c", f.to_str().unwrap()]), &[]).map_err(|e| e.to_string())
        };
        assert_eq!(pool("weight = 10000").unwrap().pools[0].weight, 10000);
        let e = pool("weight = 10001").unwrap_err();
        assert!(
            e.contains("`weight`") && e.contains("from 1 to 10000"),
            "{e}"
        );
        let e = pool("port = 0").unwrap_err();
        assert!(e.contains("`port`") && e.contains("1 to 65535"), "{e}");
        let e = pool("args = [\"a\\u0000b\"]").unwrap_err();
        assert!(e.contains("`args`") && e.contains("NUL"), "{e}");
        let e = pool("env = { \"A=B\" = \"1\" }").unwrap_err();
        assert!(e.contains("`env`") && e.contains("A=B=1"), "{e}");
        assert!(pool("env = { A = \"x=y\" }").is_ok());
    }

    #[test]
    fn control_characters_in_values_are_shown_escaped() {
        let e = with_env(&args(&["--policy", "a\nb\r"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a\\nb\\r`") && e.lines().count() == 1, "{e}");
        let e = with_env(&args(&["-c", "/no/such\ndir/lb.toml"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("such\\ndir") && e.lines().count() == 1, "{e}");
    }

    #[test]
    fn stop_signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("quit"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal(" 15 "), Some(libc::SIGTERM));
        assert_eq!(
            parse_signal("SIGKILL"),
            None,
            "not catchable: no graceful stop"
        );
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn missing_command_is_refused() {
        let e = with_env(&args(&["--", "no-such-program-xyz"]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-program-xyz") && e.contains("not found in PATH"),
            "{e}"
        );
        let e = with_env(&args(&["--", "/nonexistent/prog"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let c = with_env(&args(&["--", "sh", "-c", "true"]), &[]).unwrap();
        assert!(c.pools[0].command.is_absolute());
        assert_eq!(c.pools[0].args, ["-c", "true"]);
    }

    #[test]
    fn pools_with_weights_and_env() {
        let f = temp_file(
            "pools.toml",
            "[[pool]]\nname=\"main\"\ncommand=\"sh\"\ncount=3\nweight=3\nenv={A=\"1\"}\n\
             [[pool]]\nname=\"canary\"\ncommand=\"sh\"\ncount=1\n",
        );
        let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
        assert_eq!(c.slots(), 4);
        assert_eq!(c.slot_pools(), [0, 0, 0, 1]);
        assert_eq!((c.pools[0].weight, c.pools[1].weight), (3, 1));
        assert_eq!(c.pools[0].env, [("A".to_string(), "1".to_string())]);
        let e = with_env(&args(&["-c", f.to_str().unwrap(), "-w", "2"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--workers") && e.contains("2 pools"), "{e}");
    }

    #[test]
    fn file_errors_name_file_and_line() {
        let f = temp_file("bad.toml", "listen = \"127.0.0.1:1\"\npolcy = \"rr\"\n");
        let e = with_env(&args(&["-c", f.to_str().unwrap()]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.toml:2:") && e.contains("polcy"), "{e}");
        let f = temp_file("zero.toml", "[[pool]]\ncommand=\"sh\"\nweight=0\n");
        let e = with_env(&args(&["-c", f.to_str().unwrap()]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight"), "{e}");
        let e = with_env(&args(&["-c", "/nonexistent/lb.toml"]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/lb.toml"),
            "{e}"
        );
    }
}
