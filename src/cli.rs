//! The command line, as clap sees it: raw values only. Validation and merging
//! with the environment and `lb.toml` happen in [`crate::config`].

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lb",
    version,
    about = "A pre-forking L4 TCP load balancer: accepts on one port and hands each \
             connection (the fd itself) to one of N worker processes it supervises.",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  lb                                    # 1 worker per CPU running the bundled hello server\n  \
                  lb --workers 4 --policy lc -- python3 examples/hello.py\n  \
                  SCHED_POLICY=wrr lb --config lb.toml"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub start: StartArgs,
}

/// Starting a master. Every option is optional here: a missing one falls back
/// to the environment, then `lb.toml`, then the default.
#[derive(Debug, Default, Clone, Args)]
pub struct StartArgs {
    /// Address to accept connections on [env: LB_LISTEN] [default: 127.0.0.1:8000]
    #[arg(short, long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// Number of workers, 1 to 1024 [env: LB_WORKERS] [default: the CPUs
    /// this process may use]
    #[arg(short, long, value_name = "N")]
    pub workers: Option<String>,

    /// Scheduling policy: rr (round-robin), wrr (weighted round-robin) or lc
    /// (least-conn); the long names work too [env: SCHED_POLICY] [default: rr]
    #[arg(short, long, value_name = "POLICY")]
    pub policy: Option<String>,

    /// How workers get connections: native (lb's protocol on fd 3), node
    /// (an unmodified Node.js app as a cluster worker), shim (an unmodified,
    /// dynamically linked server; an LD_PRELOAD shim turns its accept() into
    /// lb's hand-off), proxy (a server on a port of its own; lb relays) or
    /// shared (the server accepts from lb's listener itself) [env: LB_MODE]
    /// [default: node when the command is `node`, else native]
    #[arg(short, long, value_name = "MODE")]
    pub mode: Option<String>,

    /// Configuration file (see lb.toml.example) [env: LB_CONFIG]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listen backlog, 1 to 65535 (net.core.somaxconn caps it)
    /// [env: LB_BACKLOG] [default: 4096]
    #[arg(long, value_name = "N")]
    pub backlog: Option<String>,

    /// How long workers get to finish on shutdown, from 1ms to 24h, e.g.
    /// 10s or 500ms [env: LB_DRAIN_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,

    /// How long a worker may take to say READY before it is killed and
    /// restarted, from 1ms to 24h [env: LB_READY_TIMEOUT] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub ready_timeout: Option<String>,

    /// A worker that exits sooner than this after starting counts as a failed
    /// start (backoff grows; repeated ones are a crash loop), from 0 to 24h
    /// [env: LB_MIN_UPTIME] [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub min_uptime: Option<String>,

    /// Append the workers' prefixed output lines to this file instead of
    /// lb's stderr; checked at start [env: LB_WORKER_LOG]
    #[arg(long, value_name = "FILE")]
    pub worker_log: Option<PathBuf>,

    /// Replace a worker after this many connections (up to 10^12), its
    /// successor ready first [env: LB_MAX_CONNS_PER_WORKER] [default: 0, no
    /// limit]
    #[arg(long, value_name = "N")]
    pub max_conns_per_worker: Option<String>,

    /// Replace a worker whose resident memory exceeds this (checked once a
    /// second), its successor ready first: 1M to 1024G, e.g. 512MB (a bare
    /// number is bytes) [env: LB_MAX_RSS] [default: 0, no limit]
    #[arg(long, value_name = "SIZE")]
    pub max_rss: Option<String>,

    /// How many workers a rolling reload replaces at once, 1 to 1024
    /// [env: LB_RELOAD_PARALLEL] [default: 1]
    #[arg(long, value_name = "N")]
    pub reload_parallel: Option<String>,

    /// How many connections may wait in one worker's channel before lb
    /// skips that worker, 1 to 4096 [env: LB_WORKER_QUEUE] [default: 64]
    #[arg(long, value_name = "N")]
    pub worker_queue: Option<String>,

    /// A worker with connections waiting that takes none for this long is
    /// replaced (its successor ready first) and its queue handed to the
    /// others; 0 = never [env: LB_STALL_TIMEOUT] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub stall_timeout: Option<String>,

    /// Proxy mode: connections relayed at once, 1 to 1048576; beyond it lb
    /// stops accepting until one ends. Each relay costs 6 open files, checked
    /// against the open-files limit at start [env: LB_MAX_CONNS]
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_conns: Option<String>,

    /// Proxy mode: a connect to a worker not done in this long is refused
    /// and the client, which has sent it nothing, goes to another worker;
    /// from 1ms to 24h [env: LB_PROXY_CONNECT_TIMEOUT] [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub proxy_connect_timeout: Option<String>,

    /// Proxy mode: a connection that moved no byte in either direction for
    /// this long is reset on both sides; from 1ms to 24h, 0 = off
    /// [env: LB_PROXY_IDLE_TIMEOUT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub proxy_idle_timeout: Option<String>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics [env: LB_METRICS]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,

    /// The control socket for `lb status/stop/send`, in an existing directory
    /// (checked at start) [env: LB_CONTROL] [default: lb-<port>.sock in
    /// /run/lb as root, else in $XDG_RUNTIME_DIR or /tmp/lb-<uid>]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// The worker command and its arguments [default: the bundled hello server]
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Which running master a control subcommand talks to.
#[derive(Debug, Default, Clone, Args)]
pub struct Target {
    /// The master's control socket [env: LB_CONTROL] [default: lb-<port>.sock
    /// in /run/lb as root; else the first that answers of $XDG_RUNTIME_DIR,
    /// /tmp/lb-<uid>, /run/lb]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Or the address it listens on, to find its default control socket
    /// [env: LB_LISTEN] [default: 127.0.0.1:8000]
    #[arg(short, long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the master and its workers (like `pm2 ls`)
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the configuration and replace every worker without dropping a
    /// connection: each new worker takes over only once it is ready (as
    /// SIGHUP does). Returns once every slot has switched (exit 1 if the
    /// reload failed); the replaced workers may still be draining
    Reload {
        /// Also wait until every replaced worker has drained and exited
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Change the number of workers: N, +N or -N (SIGTTIN/SIGTTOU add or
    /// remove one). New workers join once ready; removed ones drain
    Scale {
        /// N, +N or -N
        #[arg(allow_hyphen_values = true)]
        count: String,
        #[command(flatten)]
        target: Target,
    },
    /// Drain every worker and stop the master (as SIGTERM does)
    Stop {
        #[command(flatten)]
        target: Target,
    },
    /// Send a message to one worker (by slot) or to all of them
    Send {
        /// A slot number, or `all`
        slot: String,
        /// The message (at most 4080 bytes)
        message: String,
        #[command(flatten)]
        target: Target,
    },
    /// The bundled example worker: an HTTP/1.1 server speaking lb's protocol
    /// on fd 3. Started by lb itself when no worker command is given.
    #[command(hide = true)]
    HelloWorker,
    /// Started by a master: kills its workers' process groups if it dies
    /// (see `supervisor::reaper`).
    #[command(hide = true)]
    ReapGroups,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn command_follows_double_dash() {
        let cli = Cli::try_parse_from(["lb", "-w", "2", "--", "python3", "-u", "app.py"]).unwrap();
        assert_eq!(cli.start.workers.as_deref(), Some("2"));
        assert_eq!(cli.start.command, ["python3", "-u", "app.py"]);
        assert!(cli.command.is_none());
    }

    #[test]
    fn help_names_every_mode_and_policy() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let named = [
            "native (",
            "node (",
            "shim (",
            "proxy (",
            "shared (",
            "rr (round-robin)",
            "wrr (weighted round-robin)",
            "lc (least-conn)",
        ];
        for name in named {
            assert!(help.contains(name), "{name}: {help}");
        }
    }

    #[test]
    fn help_gives_the_bounds() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for bound in [
            "from 1ms to 24h",
            "from 1ms to 24h, 0 = off",
            "from 0 to 24h",
            "1 to 65535",
            "1 to 1048576",
            "1M to 1024G",
            "up to 10^12",
            "Number of workers, 1 to 1024",
        ] {
            assert!(help.contains(bound), "{bound}: {help}");
        }
    }

    #[test]
    fn hidden_worker_subcommand_parses() {
        let cli = Cli::try_parse_from(["lb", "hello-worker"]).unwrap();
        assert!(matches!(cli.command, Some(Command::HelloWorker)));
    }
}
