//! Every setting, declared once: its flag, environment variable, `lb.toml`
//! key, default, help and parser. The command line (`crate::cli`), the
//! layering ([`super::sources`]), `--help`, and the checks of
//! `lb.toml.example` and of the fuzz test are all derived from this table.
//! A new setting is an entry here (and in [`ALL`]), its key in
//! `file::File` (a test checks the two agree), and its field in
//! [`super::Config`], read in `load`.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use super::file::File;
use super::{Mode, bounds, defaults, parse};
use crate::policy::PolicyKind;

/// What a setting is, apart from its value's type.
#[derive(Debug)]
pub struct Spec {
    /// The `lb.toml` key, and clap's id for the flag.
    pub key: &'static str,
    pub flag: &'static str,
    pub short: Option<char>,
    pub env: &'static str,
    pub value_name: &'static str,
    /// What it does, for `--help` (its variable and default follow).
    pub help: &'static str,
    /// Taken when the setting is not given, parsed as a given value is.
    pub default: Option<&'static str>,
    /// For `--help` when there is no `default`: what lb does without it.
    pub unset: Option<&'static str>,
    /// Its value in `lb.toml`, as text; `None` for `--config` itself.
    pub file: Option<fn(&File) -> Option<String>>,
    /// Any bytes (a path) rather than UTF-8 text.
    pub path: bool,
    /// The flag may be repeated; its values are joined by commas.
    pub many: bool,
}

impl Spec {
    /// The flag without its dashes (clap's `long`).
    pub fn long(&self) -> &'static str {
        self.flag.trim_start_matches('-')
    }

    /// Its line in `--help`.
    pub fn help_text(&self) -> String {
        let mut text = format!("{} [env: {}]", self.help, self.env);
        if let Some(d) = self.default.or(self.unset) {
            text.push_str(&format!(" [default: {d}]"));
        }
        text
    }
}

/// A setting and how its text becomes a `T`; a refusal is the `expected`
/// part of [`super::ConfigError::Invalid`].
pub struct Setting<T> {
    pub spec: Spec,
    pub parse: fn(&OsStr) -> Result<T, String>,
}

impl<T> Deref for Setting<T> {
    type Target = Spec;
    fn deref(&self) -> &Spec {
        &self.spec
    }
}

/// Every setting, in `--help`'s order.
pub const ALL: &[&Spec] = &[
    &LISTEN.spec,
    &WORKERS.spec,
    &POLICY.spec,
    &MODE.spec,
    &CONFIG.spec,
    &BACKLOG.spec,
    &DRAIN_TIMEOUT.spec,
    &READY_TIMEOUT.spec,
    &MIN_UPTIME.spec,
    &WORKER_LOG.spec,
    &MAX_CONNS_PER_WORKER.spec,
    &MAX_RSS.spec,
    &RELOAD_PARALLEL.spec,
    &WORKER_QUEUE.spec,
    &STALL_TIMEOUT.spec,
    &MAX_CONNS.spec,
    &PROXY_CONNECT_TIMEOUT.spec,
    &PROXY_IDLE_TIMEOUT.spec,
    &PROXY_PROTOCOL.spec,
    &PROXY_TRUSTED.spec,
    &PROXY_UNTRUSTED.spec,
    &PROXY_HEADER_TIMEOUT.spec,
    &SEND_PROXY.spec,
    &METRICS.spec,
    &CONTROL.spec,
    &DISPATCH.spec,
    &MIN_READY.spec,
    &LOG_FORMAT.spec,
    &LOG_TIMESTAMPS.spec,
    &LOG_FILE.spec,
    &USER.spec,
    &GROUP.spec,
    &CWD.spec,
    &UMASK.spec,
    &MAX_CONNS_PER_WORKER_JITTER.spec,
    &WATCH.spec,
];

/// Values other than paths reach here as UTF-8 (clap checks the command
/// line; the environment and `lb.toml` are read as text).
fn text(v: &OsStr) -> Cow<'_, str> {
    v.to_string_lossy()
}

const fn spec(key: &'static str, flag: &'static str, env: &'static str) -> Spec {
    Spec {
        key,
        flag,
        short: None,
        env,
        value_name: "N",
        help: "",
        default: None,
        unset: None,
        file: None,
        path: false,
        many: false,
    }
}

pub const LISTEN: Setting<Vec<super::Address>> = Setting {
    spec: Spec {
        short: Some('l'),
        value_name: "ADDRESS",
        help: "Address to accept connections on: HOST:PORT, [IPv6]:PORT or unix:/PATH; \
               repeat the flag (or separate by commas) for several, served by the same \
               workers ([[listen]] in lb.toml sets each one's backlog and PROXY settings)",
        default: Some(defaults::LISTEN),
        file: Some(|f| f.listen.as_ref().map(super::listen::FileListen::addresses)),
        many: true,
        ..spec("listen", "--listen", "LB_LISTEN")
    },
    parse: |v| super::Address::parse_list(&text(v)),
};

/// Outside the pools: the size of the single pool (from the command line
/// or the environment), or of each pool that sets no `count` (from the
/// file).
pub const WORKERS: Setting<usize> = Setting {
    spec: Spec {
        short: Some('w'),
        help: "Number of workers, 1 to 1024",
        unset: Some("the CPUs this process may use"),
        file: Some(|f| f.workers.map(|n| n.to_string())),
        ..spec("workers", "--workers", "LB_WORKERS")
    },
    parse: |v| parse::count(&text(v)),
};

pub const POLICY: Setting<PolicyKind> = Setting {
    spec: Spec {
        short: Some('p'),
        value_name: "POLICY",
        help: "Scheduling policy: rr (round-robin), wrr (weighted round-robin) or lc \
               (least-conn); the long names work too",
        default: Some("rr"),
        file: Some(|f| f.policy.clone()),
        ..spec("policy", "--policy", "SCHED_POLICY")
    },
    parse: |v| {
        text(v)
            .parse()
            .map_err(|_| "use rr (round-robin), wrr (weighted) or lc (least-conn)".into())
    },
};

/// From the command line or the environment it applies to every pool; in
/// the file, it is the default of pools without a `mode`.
pub const MODE: Setting<Mode> = Setting {
    spec: Spec {
        short: Some('m'),
        value_name: "MODE",
        help: "How workers get connections: native (lb's protocol on fd 3), node (an \
               unmodified Node.js app as a cluster worker), shim (an unmodified, dynamically \
               linked server; an LD_PRELOAD shim turns its accept() into lb's hand-off), proxy \
               (a server on a port of its own; lb relays) or shared (the server accepts from \
               lb's listener itself)",
        unset: Some("node when the command is `node`, else native"),
        file: Some(|f| f.mode.clone()),
        ..spec("mode", "--mode", "LB_MODE")
    },
    parse: |v| Mode::parse(&text(v)).ok_or_else(|| Mode::CHOICES.into()),
};

/// Set only on the command line or in the environment.
pub const CONFIG: Setting<PathBuf> = Setting {
    spec: Spec {
        short: Some('c'),
        value_name: "FILE",
        help: "Configuration file (see lb.toml.example)",
        path: true,
        ..spec("config", "--config", "LB_CONFIG")
    },
    parse: |v| Ok(v.into()),
};

pub const BACKLOG: Setting<u32> = Setting {
    spec: Spec {
        help: "Listen backlog, 1 to 65535 (net.core.somaxconn caps it)",
        default: Some("4096"),
        file: Some(|f| f.backlog.map(|n| n.to_string())),
        ..spec("backlog", "--backlog", "LB_BACKLOG")
    },
    parse: |v| parse::whole_number(&text(v), bounds::BACKLOG_MAX, ""),
};

pub const DRAIN_TIMEOUT: Setting<Duration> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "How long workers get to finish on shutdown, from 1ms to 24h, e.g. 10s or 500ms",
        default: Some(defaults::DRAIN_TIMEOUT),
        file: Some(|f| f.drain_timeout.clone()),
        ..spec("drain_timeout", "--drain-timeout", "LB_DRAIN_TIMEOUT")
    },
    parse: |v| parse::duration(&text(v), bounds::TIMEOUT_MIN),
};

pub const READY_TIMEOUT: Setting<Duration> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "How long a worker may take to say READY before it is killed and restarted, \
               from 1ms to 24h",
        default: Some(defaults::READY_TIMEOUT),
        file: Some(|f| f.ready_timeout.clone()),
        ..spec("ready_timeout", "--ready-timeout", "LB_READY_TIMEOUT")
    },
    parse: |v| parse::duration(&text(v), bounds::TIMEOUT_MIN),
};

/// 0 is meaningful here: every exit of a worker that was ready resets the
/// backoff.
pub const MIN_UPTIME: Setting<Duration> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "A worker that exits sooner than this after starting counts as a failed start \
               (backoff grows; repeated ones are a crash loop), from 0 to 24h",
        default: Some(defaults::MIN_UPTIME),
        file: Some(|f| f.min_uptime.clone()),
        ..spec("min_uptime", "--min-uptime", "LB_MIN_UPTIME")
    },
    parse: |v| parse::duration(&text(v), Duration::ZERO),
};

pub const WORKER_LOG: Setting<PathBuf> = Setting {
    spec: Spec {
        value_name: "FILE",
        help: "Append the workers' output lines to this file instead of lb's log; {pool}, \
               {slot} and {stream} (stdout or stderr) in the path give each its own file, e.g. \
               /var/log/lb/{pool}-{slot}.{stream}.log; checked at start, reopened on SIGUSR1",
        file: Some(|f| f.worker_log.clone()),
        path: true,
        ..spec("worker_log", "--worker-log", "LB_WORKER_LOG")
    },
    parse: |v| crate::log::pattern::check(v).map(|()| v.into()),
};

pub const MAX_CONNS_PER_WORKER: Setting<Option<u64>> = Setting {
    spec: Spec {
        help: "Replace a worker after this many connections (up to 10^12), its successor \
               ready first",
        unset: Some("0, no limit"),
        file: Some(|f| f.max_conns_per_worker.map(|n| n.to_string())),
        ..spec(
            "max_conns_per_worker",
            "--max-conns-per-worker",
            "LB_MAX_CONNS_PER_WORKER",
        )
    },
    parse: |v| parse::limit(&text(v), bounds::CONNS_PER_WORKER_MAX),
};

pub const MAX_RSS: Setting<Option<u64>> = Setting {
    spec: Spec {
        value_name: "SIZE",
        help: "Replace a worker whose resident memory exceeds this (checked once a second), \
               its successor ready first: 1M to 1024G, e.g. 512MB (a bare number is bytes)",
        unset: Some("0, no limit"),
        file: Some(|f| f.max_rss.clone()),
        ..spec("max_rss", "--max-rss", "LB_MAX_RSS")
    },
    parse: |v| parse::size_limit(&text(v), bounds::RSS_MIN, bounds::RSS_MAX),
};

pub const RELOAD_PARALLEL: Setting<usize> = Setting {
    spec: Spec {
        help: "How many workers a rolling reload replaces at once, 1 to 1024",
        default: Some("1"),
        file: Some(|f| f.reload_parallel.map(|n| n.to_string())),
        ..spec("reload_parallel", "--reload-parallel", "LB_RELOAD_PARALLEL")
    },
    parse: |v| parse::count(&text(v)),
};

pub const WORKER_QUEUE: Setting<usize> = Setting {
    spec: Spec {
        help: "How many connections may wait in one worker's channel before lb skips that \
               worker, 1 to 4096 (CONN messages of up to 8 for a worker that said BATCH)",
        default: Some("64"),
        file: Some(|f| f.worker_queue.map(|n| n.to_string())),
        ..spec("worker_queue", "--worker-queue", "LB_WORKER_QUEUE")
    },
    parse: |v| parse::whole_number(&text(v), bounds::WORKER_QUEUE_MAX, ""),
};

/// 0 is never.
pub const STALL_TIMEOUT: Setting<Option<Duration>> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "A worker with connections waiting that takes none for this long is replaced \
               (its successor ready first) and its queue handed to the others; 0 = never",
        default: Some(defaults::STALL_TIMEOUT),
        file: Some(|f| f.stall_timeout.clone()),
        ..spec("stall_timeout", "--stall-timeout", "LB_STALL_TIMEOUT")
    },
    parse: |v| parse::duration(&text(v), Duration::ZERO).map(|d| Some(d).filter(|d| !d.is_zero())),
};

pub const MAX_CONNS: Setting<usize> = Setting {
    spec: Spec {
        help: "Proxy mode: connections relayed at once, 1 to 1048576; beyond it lb stops \
               accepting until one ends. Each relay costs 6 open files, checked against the \
               open-files limit at start",
        default: Some("1024"),
        file: Some(|f| f.max_conns.map(|n| n.to_string())),
        ..spec("max_conns", "--max-conns", "LB_MAX_CONNS")
    },
    parse: |v| {
        parse::whole_number(
            &text(v),
            bounds::MAX_CONNS_MAX,
            " (each relay costs 6 open files)",
        )
    },
};

/// 0 would refuse every connect; the kernel gives up on its own after its
/// SYN retries (about 2 minutes), so there is no "off" to offer.
pub const PROXY_CONNECT_TIMEOUT: Setting<Duration> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "Proxy mode: a connect to a worker not done in this long is refused and the \
               client, which has sent it nothing, goes to another worker; from 1ms to 24h",
        default: Some(defaults::PROXY_CONNECT_TIMEOUT),
        file: Some(|f| f.proxy_connect_timeout.clone()),
        ..spec(
            "proxy_connect_timeout",
            "--proxy-connect-timeout",
            "LB_PROXY_CONNECT_TIMEOUT",
        )
    },
    parse: |v| parse::duration(&text(v), bounds::TIMEOUT_MIN),
};

/// 0 is off: long-lived quiet connections (a database's pool) are a normal
/// thing to relay.
pub const PROXY_IDLE_TIMEOUT: Setting<Option<Duration>> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "Proxy mode: a connection that moved no byte in either direction for this long \
               is reset on both sides; from 1ms to 24h, 0 = off",
        default: Some(defaults::PROXY_IDLE_TIMEOUT),
        file: Some(|f| f.proxy_idle_timeout.clone()),
        ..spec(
            "proxy_idle_timeout",
            "--proxy-idle-timeout",
            "LB_PROXY_IDLE_TIMEOUT",
        )
    },
    parse: |v| parse::duration_or_off(&text(v)),
};

pub const PROXY_PROTOCOL: Setting<super::ProxyProtocol> = Setting {
    spec: Spec {
        value_name: "VERSION",
        help: "Read a PROXY protocol header (HAProxy's; AWS NLB, ELB) at the start of each \
               connection from a --proxy-trusted balancer and give the workers the client's \
               address: off, v1 (text), v2 (binary) or any (docs/proxy-protocol.md)",
        default: Some("off"),
        file: Some(|f| f.proxy_protocol.clone()),
        ..spec("proxy_protocol", "--proxy-protocol", "LB_PROXY_PROTOCOL")
    },
    parse: |v| {
        super::ProxyProtocol::parse(&text(v)).ok_or_else(|| super::ProxyProtocol::CHOICES.into())
    },
};

pub const PROXY_TRUSTED: Setting<Vec<super::Cidr>> = Setting {
    spec: Spec {
        value_name: "CIDRS",
        help: "With --proxy-protocol: the networks the balancers connect from, \
               comma-separated, IPv4 or IPv6, e.g. 10.0.0.0/8,192.168.0.0/16; only they may \
               send a header",
        unset: Some("none"),
        file: Some(|f| f.proxy_trusted.as_ref().map(super::file::Paths::joined)),
        ..spec("proxy_trusted", "--proxy-trusted", "LB_PROXY_TRUSTED")
    },
    parse: |v| super::proxy::cidrs(&text(v)),
};

pub const PROXY_UNTRUSTED: Setting<super::Untrusted> = Setting {
    spec: Spec {
        value_name: "WHAT",
        help: "With --proxy-protocol: a connection from outside --proxy-trusted is refused \
               (closed and counted) or served (as a direct client, no header expected)",
        default: Some("refuse"),
        file: Some(|f| f.proxy_untrusted.clone()),
        ..spec("proxy_untrusted", "--proxy-untrusted", "LB_PROXY_UNTRUSTED")
    },
    parse: |v| super::Untrusted::parse(&text(v)).ok_or_else(|| super::Untrusted::CHOICES.into()),
};

pub const PROXY_HEADER_TIMEOUT: Setting<Duration> = Setting {
    spec: Spec {
        value_name: "DURATION",
        help: "With --proxy-protocol: a connection whose header has not all arrived in this \
               long is closed and counted; from 1ms to 24h",
        default: Some(defaults::PROXY_HEADER_TIMEOUT),
        file: Some(|f| f.proxy_header_timeout.clone()),
        ..spec(
            "proxy_header_timeout",
            "--proxy-header-timeout",
            "LB_PROXY_HEADER_TIMEOUT",
        )
    },
    parse: |v| parse::duration(&text(v), bounds::TIMEOUT_MIN),
};

/// From the command line or the environment it applies to every pool; in
/// the file, it is the default of pools without a `send_proxy` (as `mode`
/// is).
pub const SEND_PROXY: Setting<super::SendProxy> = Setting {
    spec: Spec {
        value_name: "VERSION",
        help: "Proxy mode: write a PROXY protocol header with the client's address to each \
               worker's port before relaying: off, v1 or v2 (HAProxy's send-proxy)",
        default: Some("off"),
        file: Some(|f| f.send_proxy.clone()),
        ..spec("send_proxy", "--send-proxy", "LB_SEND_PROXY")
    },
    parse: |v| super::SendProxy::parse(&text(v)).ok_or_else(|| super::SendProxy::CHOICES.into()),
};

pub const METRICS: Setting<SocketAddr> = Setting {
    spec: Spec {
        value_name: "HOST:PORT",
        help: "Serve Prometheus metrics at http://HOST:PORT/metrics",
        file: Some(|f| f.metrics.clone()),
        ..spec("metrics", "--metrics", "LB_METRICS")
    },
    parse: |v| parse::address(&text(v), "127.0.0.1:9090"),
};

pub const CONTROL: Setting<PathBuf> = Setting {
    spec: Spec {
        value_name: "PATH",
        help: "The control socket for `lb status/stop/send`, in an existing directory \
               (checked at start)",
        unset: Some("lb-<port>.sock in /run/lb as root, else in $XDG_RUNTIME_DIR or /tmp/lb-<uid>"),
        file: Some(|f| f.control.clone()),
        path: true,
        ..spec("control", "--control", "LB_CONTROL")
    },
    parse: |v| Ok(v.into()),
};

pub const DISPATCH: Setting<super::Dispatch> = Setting {
    spec: Spec {
        value_name: "WHO",
        help: "Who picks each connection's worker: master (lb accepts and hands it on), kernel (a \
               BPF program steers it to the worker's own listener; shared or node mode, rr or \
               wrr, root or CAP_BPF and CAP_NET_ADMIN) or auto (kernel where it can, else master)",
        default: Some("master"),
        file: Some(|f| f.dispatch.clone()),
        ..spec("dispatch", "--dispatch", "LB_DISPATCH")
    },
    parse: |v| super::Dispatch::parse(&text(v)).ok_or_else(|| super::Dispatch::CHOICES.into()),
};

/// 0 is meaningful: ready whenever lb is not stopping (a front that only
/// needs to know lb is up and accepting).
pub const MIN_READY: Setting<usize> = Setting {
    spec: Spec {
        help: "How many workers must be ready for /readyz on the metrics listener to answer \
               200, 0 to 1024 (never while lb is stopping)",
        default: Some("1"),
        file: Some(|f| f.min_ready.map(|n| n.to_string())),
        ..spec("min_ready", "--min-ready", "LB_MIN_READY")
    },
    parse: |v| match text(v).trim().parse::<usize>() {
        Ok(n) if n <= super::defaults::MAX_WORKERS => Ok(n),
        _ => Err(format!(
            "give a whole number from 0 to {}",
            super::defaults::MAX_WORKERS
        )),
    },
};

pub const LOG_FORMAT: Setting<crate::log::LogFormat> = Setting {
    spec: Spec {
        value_name: "FORMAT",
        help: "How log lines look: text (a timestamp, a level, the message) or json (one \
               object a line, the workers' output lines too)",
        default: Some("text"),
        file: Some(|f| f.log_format.clone()),
        ..spec("log_format", "--log-format", "LB_LOG_FORMAT")
    },
    parse: |v| crate::log::LogFormat::parse(&text(v)).ok_or_else(|| "use text or json".into()),
};

pub const LOG_TIMESTAMPS: Setting<crate::log::Timestamps> = Setting {
    spec: Spec {
        value_name: "WHEN",
        help: "Whether log lines start with their time: on, off, or auto (off for lines that \
               go to journald, which stamps them itself)",
        default: Some("auto"),
        file: Some(|f| f.log_timestamps.clone()),
        ..spec("log_timestamps", "--log-timestamps", "LB_LOG_TIMESTAMPS")
    },
    parse: |v| crate::log::Timestamps::parse(&text(v)).ok_or_else(|| "use on, off or auto".into()),
};

pub const LOG_FILE: Setting<PathBuf> = Setting {
    spec: Spec {
        value_name: "FILE",
        help: "Append lb's own log lines (and the workers', without --worker-log) to this file \
               instead of stderr; checked at start, reopened on SIGUSR1",
        unset: Some("stderr"),
        file: Some(|f| f.log_file.clone()),
        path: true,
        ..spec("log_file", "--log-file", "LB_LOG_FILE")
    },
    parse: |v| {
        if v.is_empty() {
            Err("give the path of a file".into())
        } else {
            Ok(v.into())
        }
    },
};

/// From the command line or the environment it applies to every pool; in
/// the file, it is the default of pools without a `user` (as `mode` is).
pub const USER: Setting<String> = Setting {
    spec: Spec {
        value_name: "USER",
        help: "Run the workers as this user (a name or a uid), with its groups; lb must \
               run as root (or with CAP_SETUID and CAP_SETGID) to switch",
        unset: Some("lb's own user"),
        file: Some(|f| f.user.clone()),
        ..spec("user", "--user", "LB_USER")
    },
    parse: |v| super::run_as::name(&text(v), "a user name or uid, e.g. www-data"),
};

pub const GROUP: Setting<String> = Setting {
    spec: Spec {
        value_name: "GROUP",
        help: "Run the workers with this group (a name or a gid) as their primary group",
        unset: Some("the --user's primary group, else lb's own"),
        file: Some(|f| f.group.clone()),
        ..spec("group", "--group", "LB_GROUP")
    },
    parse: |v| super::run_as::name(&text(v), "a group name or gid, e.g. www-data"),
};

pub const CWD: Setting<PathBuf> = Setting {
    spec: Spec {
        value_name: "DIR",
        help: "The directory workers start in (an existing one; relative to lb's own)",
        unset: Some("lb's own working directory"),
        file: Some(|f| f.cwd.clone()),
        path: true,
        ..spec("cwd", "--cwd", "LB_CWD")
    },
    parse: |v| Ok(v.into()),
};

pub const UMASK: Setting<u32> = Setting {
    spec: Spec {
        value_name: "MODE",
        help: "The workers' umask, in octal, e.g. 027",
        unset: Some("lb's own umask"),
        file: Some(|f| f.umask.as_ref().map(super::run_as::Octal::text)),
        ..spec("umask", "--umask", "LB_UMASK")
    },
    parse: |v| super::run_as::umask(&text(v)),
};

/// gunicorn's `max_requests_jitter`: drawn per worker at its spawn.
pub const MAX_CONNS_PER_WORKER_JITTER: Setting<u64> = Setting {
    spec: Spec {
        help: "With --max-conns-per-worker: each worker's limit is that plus a random 0 to \
               this many (drawn at its start, up to 10^12), so workers started together are \
               not all replaced at once",
        unset: Some("0, every worker at the same limit"),
        file: Some(|f| f.max_conns_per_worker_jitter.map(|n| n.to_string())),
        ..spec(
            "max_conns_per_worker_jitter",
            "--max-conns-per-worker-jitter",
            "LB_MAX_CONNS_PER_WORKER_JITTER",
        )
    },
    parse: |v| parse::limit(&text(v), bounds::CONNS_PER_WORKER_MAX).map(|n| n.unwrap_or(0)),
};

/// Read at start only: what to watch is not changed by a reload.
pub const WATCH: Setting<Vec<PathBuf>> = Setting {
    spec: Spec {
        value_name: "PATHS",
        help: "Reload (rolling, as SIGHUP does) when a file under these comma-separated paths \
               changes, once they have been quiet for 500ms; dotfiles, node_modules, \
               __pycache__, *.pyc, *.log and lb's own files are ignored",
        unset: Some("nothing is watched"),
        file: Some(|f| f.watch.as_ref().map(super::file::Paths::joined)),
        path: true,
        ..spec("watch", "--watch", "LB_WATCH")
    },
    parse: |v| parse::paths(v),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed<T>(s: &Setting<T>) -> T {
        let d = s.default.expect("a default");
        (s.parse)(OsStr::new(d)).unwrap_or_else(|e| panic!("{}: {e}", s.key))
    }

    #[test]
    fn every_default_parses_to_its_constant() {
        for s in ALL {
            assert!(
                s.default.is_none() || s.unset.is_none(),
                "{}: one default",
                s.key
            );
            assert_eq!(s.flag, format!("--{}", s.key.replace('_', "-")));
        }
        assert_eq!(parsed(&BACKLOG), defaults::BACKLOG);
        assert_eq!(parsed(&WORKER_QUEUE), defaults::WORKER_QUEUE);
        assert_eq!(parsed(&MAX_CONNS), defaults::MAX_CONNS);
        assert_eq!(parsed(&RELOAD_PARALLEL), 1);
        assert_eq!(parsed(&POLICY), PolicyKind::RoundRobin);
        assert_eq!(parsed(&LISTEN)[0].to_string(), defaults::LISTEN);
        parsed(&DRAIN_TIMEOUT);
        parsed(&READY_TIMEOUT);
        parsed(&MIN_UPTIME);
        parsed(&STALL_TIMEOUT);
        parsed(&PROXY_CONNECT_TIMEOUT);
        parsed(&PROXY_IDLE_TIMEOUT);
        parsed(&PROXY_HEADER_TIMEOUT);
        assert_eq!(parsed(&PROXY_PROTOCOL), super::super::ProxyProtocol::Off);
        assert_eq!(parsed(&PROXY_UNTRUSTED), super::super::Untrusted::Refuse);
        assert_eq!(parsed(&SEND_PROXY), super::super::SendProxy::Off);
        assert_eq!(parsed(&MIN_READY), 1);
    }

    /// lb.toml's keys (`file::File`'s fields, which serde names in its
    /// refusal of an unknown one) are the table's, and `[[pool]]`.
    #[test]
    fn the_file_has_a_key_per_setting() {
        let (_, message) = crate::config::file::parse("no_such_key = 1").unwrap_err();
        let expected = message.split("expected one of ").nth(1).expect(&message);
        let mut keys: Vec<&str> = expected.split(", ").map(|k| k.trim_matches('`')).collect();
        let mut table: Vec<&str> = ALL
            .iter()
            .filter(|s| s.file.is_some())
            .map(|s| s.key)
            .chain(["pool"])
            .collect();
        keys.sort_unstable();
        table.sort_unstable();
        assert_eq!(keys, table);
    }

    /// Each key of the file is in lb.toml.example, with its variable, its
    /// flag and its default.
    #[test]
    fn the_example_file_documents_every_key() {
        let example = include_str!("../../lb.toml.example");
        for s in ALL.iter().filter(|s| s.file.is_some()) {
            let key = s.key;
            assert!(
                example
                    .lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
                "lb.toml.example sets no `{key}`"
            );
            for name in [s.env, s.flag] {
                assert!(example.contains(name), "lb.toml.example: {key}: {name}");
            }
            if let Some(d) = s.default {
                assert!(
                    example.contains(&format!("default: {d}"))
                        || example.contains(&format!("default: \"{d}\"")),
                    "lb.toml.example: {key}: default {d}"
                );
            }
        }
    }
}
