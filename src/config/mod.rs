//! One validated [`Config`] from the command line, the environment and
//! `lb.toml`, merged with precedence CLI > env > file > default. Each
//! setting is declared once, in [`settings`]; [`load`] layers them.
//!
//! Every refusal is one line naming the value, where it came from, and the
//! fix. [`load`] does no I/O beyond reading the file and checking that
//! worker commands exist; [`preflight`], run once at start, checks what the
//! configuration names (files, the open-files limit).

mod dispatch;
pub mod duration;
mod error;
pub(crate) mod file;
#[cfg(test)]
mod fuzz;
pub mod listen;
mod load;
mod mode;
mod parse;
mod pools;
mod preflight;
pub mod proxy;
pub mod run_as;
pub(crate) mod settings;
pub mod size;
mod sources;
#[cfg(test)]
mod tests;

pub use dispatch::Dispatch;
pub use error::{ConfigError, Origin};
pub use listen::{Address, Listener, ProxyRules};
pub use load::load;
pub use mode::{ChannelKind, DrainBy, Mode};
pub use preflight::preflight;
pub use proxy::{Cidr, ProxyProtocol, SendProxy, Untrusted};

use error::invalid;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// A PROXY header not all there by then is a slow one: closed.
    pub const PROXY_HEADER_TIMEOUT: &str = "3s";
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
    /// What lb serves, in order (at least one).
    pub listeners: Vec<Listener>,
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
    /// A header not all there after this is closed.
    pub proxy_header_timeout: Duration,
    /// Workers that must be ready for `/readyz` to answer 200.
    pub min_ready: usize,
    pub pools: Vec<Pool>,
    /// Who picks each connection's worker.
    pub dispatch: Dispatch,
    pub log_format: crate::log::LogFormat,
    pub log_timestamps: crate::log::Timestamps,
    /// Where lb's own log lines go; `None` = stderr.
    pub log_file: Option<PathBuf>,
    /// Each worker's connection limit is `max_conns_per_worker` plus a
    /// random 0 to this, drawn at its spawn.
    pub max_conns_per_worker_jitter: u64,
    /// Reload when files under these change (read at start only).
    pub watch: Vec<PathBuf>,
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
    pub log_file: Origin,
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
    /// Proxy mode: the PROXY header written to the worker's port first.
    pub send_proxy: SendProxy,
    /// How a server that does not know lb is asked to stop gracefully
    /// (shim, proxy, shared): SIGTERM unless the pool says otherwise
    /// (nginx: SIGQUIT).
    pub stop_signal: i32,
    /// The user, group, directory and umask its workers run with.
    pub run_as: run_as::RunAs,
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

    /// Whether some listener reads PROXY headers.
    pub fn any_proxy_protocol(&self) -> bool {
        self.listeners.iter().any(Listener::reads_proxy_headers)
    }

    /// The first TCP listener's address (kernel dispatch's group, Node's
    /// and the shim's port), if there is one.
    pub fn tcp_listen(&self) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|l| l.address.tcp())
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

/// Reads the environment through a function, so tests need not mutate the
/// process's own.
pub type EnvFn<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The CPUs this process may run on: affinity mask and cgroup quota aware
/// (that is what `available_parallelism` reads on Linux).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
