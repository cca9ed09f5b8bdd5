//! The command line, as clap sees it: raw values only. The master's flags
//! come from the settings table (`config::settings`); validation and
//! merging with the environment and `lb.toml` happen in [`crate::config`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand, value_parser};

use crate::config::settings::{self, Spec};

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

/// Starting a master: each setting of `config::settings::ALL` as given on the
/// command line, raw. Every one is optional here: a missing one falls back
/// to the environment, then `lb.toml`, then the default.
#[derive(Debug, Default, Clone)]
pub struct StartArgs {
    /// By the setting's key.
    values: BTreeMap<&'static str, OsString>,
    /// The worker command and its arguments (after `--`).
    pub command: Vec<OsString>,
}

impl StartArgs {
    /// The setting `key`'s value, if the command line gave it.
    pub fn value(&self, key: &str) -> Option<&OsStr> {
        self.values.get(key).map(OsString::as_os_str)
    }
}

/// The flag of one setting.
fn arg(s: &Spec) -> Arg {
    let arg = Arg::new(s.key)
        .long(s.long())
        .value_name(s.value_name)
        .action(if s.many {
            ArgAction::Append
        } else {
            ArgAction::Set
        })
        .help(s.help_text());
    let arg = match s.short {
        Some(c) => arg.short(c),
        None => arg,
    };
    if s.path {
        arg.value_parser(value_parser!(PathBuf))
    } else {
        arg.value_parser(value_parser!(String))
    }
}

impl Args for StartArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        settings::ALL
            .iter()
            .fold(cmd, |cmd, s| cmd.arg(arg(s)))
            .arg(
                Arg::new("command")
                    .last(true)
                    .value_name("COMMAND")
                    .action(ArgAction::Append)
                    .value_parser(value_parser!(OsString))
                    .help(
                        "The worker command and its arguments [default: the bundled hello server]",
                    ),
            )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for StartArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = StartArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for s in settings::ALL {
            if let Some(values) = matches.get_raw(s.key) {
                let values: Vec<&OsStr> = values.collect();
                if !values.is_empty() {
                    self.values.insert(s.key, values.join(OsStr::new(",")));
                }
            }
        }
        if let Some(command) = matches.get_raw("command") {
            self.command = command.map(OsStr::to_owned).collect();
        }
        Ok(())
    }
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

/// Why a subcommand cannot tell which control socket to try.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("invalid --listen `{0}`: give HOST:PORT (or unix:/PATH), or pass --control PATH")]
    Listen(String),
}

impl Target {
    /// The control sockets to try: --control or LB_CONTROL alone, else the
    /// search order (`crate::control::path`) for the port of --listen /
    /// LB_LISTEN / 127.0.0.1:8000. `env` looks up environment variables.
    pub fn sockets(
        &self,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Vec<PathBuf>, TargetError> {
        if let Some(p) = self
            .control
            .clone()
            .or_else(|| env("LB_CONTROL").filter(|v| !v.is_empty()).map(Into::into))
        {
            return Ok(vec![p]);
        }
        let given = self
            .listen
            .clone()
            .or_else(|| env("LB_LISTEN").and_then(|v| v.into_string().ok()));
        let named = given.is_some();
        let listen = given.unwrap_or_else(|| crate::config::defaults::LISTEN.to_string());
        // The master names its socket for its first TCP listener's port (0
        // when it has only Unix ones), as LB_LISTEN's list gives them.
        // (Only the port is read: the host need not resolve here.)
        let items: Vec<&str> = listen.split(',').map(str::trim).collect();
        let port = match items.iter().find(|a| !a.starts_with("unix:")) {
            Some(tcp) => tcp
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| TargetError::Listen(listen.clone()))?,
            None if items.iter().all(|a| a.len() > "unix:".len()) => 0,
            None => return Err(TargetError::Listen(listen)),
        };
        Ok(if named {
            crate::control::path::search(port)
        } else {
            crate::control::path::search_default(port)
        })
    }
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
    /// Change a pool's number of workers: [POOL] N, +N or -N (POOL may be
    /// left out when there is one; SIGTTIN/SIGTTOU add or remove one). New
    /// workers join once ready; the pool's highest slots drain. Running
    /// workers keep their slots. A reload keeps the count unless the
    /// configuration's count for the pool changed
    Scale {
        /// [POOL] N|+N|-N
        #[arg(
            allow_negative_numbers = true,
            num_args = 1..=2,
            required = true,
            value_names = ["POOL", "N|+N|-N"]
        )]
        args: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Replace the workers of a slot, a pool or `all` without dropping a
    /// connection: one slot at a time, each successor started and ready
    /// before the worker it replaces drains (like `pm2 reload`). Returns
    /// once every one has switched (exit 1 if a successor failed; the rest
    /// keep their workers)
    Restart {
        /// A slot number, a pool's name, or `all`
        what: String,
        /// Also wait until every replaced worker has drained and exited
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Replace the running master with the binary now at the path it was
    /// started as, in place (same pid), keeping its listeners, its workers
    /// and their connections (as SIGUSR2 does). The new binary is checked
    /// first; one that fails leaves the old master running (exit 1). Workers
    /// are not restarted: `lb reload` does that
    Upgrade {
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
    /// Print a shell completion script, e.g.
    /// `lb completions bash > /etc/bash_completion.d/lb`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g.
    /// `lb man > /usr/local/share/man/man1/lb.1`
    Man,
    /// The bundled example worker: an HTTP/1.1 server speaking lb's protocol
    /// on fd 3. Started by lb itself when no worker command is given.
    #[command(hide = true)]
    HelloWorker,
    /// Started by a master: kills its workers' process groups if it dies
    /// (see `supervisor::reaper`).
    #[command(hide = true)]
    ReapGroups,
    /// Run by a master on the binary it is to upgrade to: loads the
    /// configuration the master's arguments give, and reports (see
    /// `upgrade::check`).
    #[command(hide = true)]
    UpgradeCheck {
        /// The state format the master writes.
        #[arg(long)]
        state: u32,
        /// The master's control socket (its path is checked as at start).
        #[arg(long)]
        control_socket: Option<std::path::PathBuf>,
        /// The master's own arguments.
        #[arg(last = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
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
        assert_eq!(
            cli.start.value("workers").and_then(OsStr::to_str),
            Some("2")
        );
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
    fn a_subcommand_finds_its_master_by_control_or_port() {
        let target = |control: Option<&str>, listen: Option<&str>| Target {
            control: control.map(PathBuf::from),
            listen: listen.map(str::to_string),
        };
        let no_env = |_: &str| None;
        assert_eq!(
            target(Some("/x.sock"), Some("bad")).sockets(&no_env),
            Ok(vec![PathBuf::from("/x.sock")])
        );
        let env = |k: &str| (k == "LB_CONTROL").then(|| OsString::from("/y.sock"));
        assert_eq!(
            target(None, None).sockets(&env),
            Ok(vec![PathBuf::from("/y.sock")])
        );
        assert!(
            target(None, Some("127.0.0.1:8000"))
                .sockets(&no_env)
                .is_ok()
        );
        let e = target(None, Some("nonsense")).sockets(&no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --listen `nonsense`: give HOST:PORT (or unix:/PATH), or pass --control PATH"
        );
        // A list (LB_LISTEN's): the first TCP listener's port names the
        // socket; only Unix ones: port 0.
        for (listen, port) in [
            ("unix:/run/a.sock,127.0.0.1:8100", 8100),
            ("unix:/run/a.sock", 0),
        ] {
            let want = crate::control::path::search(port);
            assert_eq!(target(None, Some(listen)).sockets(&no_env), Ok(want));
        }
    }

    #[test]
    fn scale_takes_an_optional_pool_before_the_count() {
        let scale = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Some(Command::Scale { args, .. })) => Ok(args),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(scale(&["lb", "scale", "-1"]), Ok(vec!["-1".into()]));
        assert_eq!(
            scale(&["lb", "scale", "web", "+2"]),
            Ok(vec!["web".into(), "+2".into()])
        );
        assert!(scale(&["lb", "scale"]).is_err());
        assert!(scale(&["lb", "scale", "a", "1", "2"]).is_err());
        assert_eq!(
            scale(&["lb", "scale", "web", "-1", "--control", "/x"]),
            Ok(vec!["web".into(), "-1".into()])
        );
        assert_eq!(
            scale(&["lb", "scale", "-3", "--listen", "h:1"]),
            Ok(vec!["-3".into()])
        );
        let cli = Cli::try_parse_from(["lb", "restart", "web", "--wait"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Restart { what, wait: true, .. }) if what == "web"
        ));
    }

    #[test]
    fn hidden_worker_subcommand_parses() {
        let cli = Cli::try_parse_from(["lb", "hello-worker"]).unwrap();
        assert!(matches!(cli.command, Some(Command::HelloWorker)));
    }
}
