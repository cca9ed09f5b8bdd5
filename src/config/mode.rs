//! How a pool's workers get their connections.

use std::ffi::OsString;
use std::path::Path;

/// A pool's worker mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// lb's own protocol on fd 3 (`docs/protocol.md`).
    #[default]
    Native,
    /// An unmodified Node.js app as a cluster worker, lb its primary
    /// (`docs/node.md`).
    Node,
    /// Any dynamically linked server, unmodified: the accept shim
    /// (`LD_PRELOAD`) turns its own listen/accept/close into lb's protocol.
    Shim,
    /// The kernel balances: every worker gets the listener itself (fd 3,
    /// `LISTEN_FDS`, einhorn's variables) and accepts from it.
    Shared,
    /// The worker listens on a loopback port of its own (`PORT`, `{port}`);
    /// lb relays each connection's bytes to it with `splice`.
    Proxy,
}

impl Mode {
    pub const CHOICES: &'static str = "use native (lb's protocol), node (Node.js cluster workers), \
         shim (any dynamically linked server), proxy (a server on a port of its own) or shared \
         (the workers accept from lb's listener)";

    pub fn parse(text: &str) -> Option<Mode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "native" | "lb" => Some(Mode::Native),
            "node" | "nodejs" | "node-cluster" => Some(Mode::Node),
            "shim" | "preload" => Some(Mode::Shim),
            "shared" | "listen-fds" => Some(Mode::Shared),
            "proxy" | "port" => Some(Mode::Proxy),
            _ => None,
        }
    }

    /// The mode a command gets when none is configured: `node` for Node.js.
    pub fn detect(command: &Path) -> Mode {
        match command.file_name().and_then(|n| n.to_str()) {
            Some("node" | "nodejs") => Mode::Node,
            _ => Mode::Native,
        }
    }

    /// Whether lb accepts this mode's connections and hands them on (all but
    /// shared, where the workers accept from the listener).
    pub fn dispatched(self) -> bool {
        self != Mode::Shared
    }

    /// What lb talks to this mode's workers over, as their fd 3.
    pub fn channel(self) -> ChannelKind {
        match self {
            Mode::Native | Mode::Shim => ChannelKind::Packets,
            Mode::Node => ChannelKind::Stream,
            Mode::Shared | Mode::Proxy => ChannelKind::None,
        }
    }

    /// Whether lb relays the connections' bytes itself (proxy), rather than
    /// giving the worker the socket.
    pub fn relays(self) -> bool {
        self == Mode::Proxy
    }

    /// Whether the master keeps a copy of the worker's end of the channel,
    /// to read back the connections a dead worker never took. Node's
    /// channel must reach EOF when the worker closes it, so it keeps none.
    pub fn keeps_peer(self) -> bool {
        self.channel() == ChannelKind::Packets
    }

    /// How a worker of this mode is told to drain.
    pub fn drained_by(self) -> DrainBy {
        match self {
            Mode::Native | Mode::Shim | Mode::Node => DrainBy::Message,
            Mode::Shared | Mode::Proxy => DrainBy::Signal,
        }
    }

    /// Why `args` cannot run as this mode's worker, if they cannot.
    pub fn check_args(self, args: &[OsString]) -> Result<(), &'static str> {
        if self != Mode::Node {
            return Ok(());
        }
        // Node sets up the cluster channel only when `process.argv[1]` (the
        // script) exists: `node -e`, `-p` and the REPL are never workers.
        let mut script = false;
        for a in args {
            let a = a.to_string_lossy();
            if matches!(
                a.as_ref(),
                "-e" | "--eval" | "-p" | "--print" | "-i" | "--interactive"
            ) {
                return Err("evaluates code instead of running a script");
            }
            if !a.starts_with('-') {
                script = true;
                break;
            }
        }
        if script {
            Ok(())
        } else {
            Err("names no script to run")
        }
    }
}

/// The channel between the master and a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// lb's protocol on a `SOCK_SEQPACKET` pair (`docs/protocol.md`).
    Packets,
    /// Node.js's cluster IPC on a `SOCK_STREAM` pair (`docs/node.md`).
    Stream,
    /// No channel: the worker accepts itself (shared) or serves a port of
    /// its own (proxy).
    None,
}

/// How a worker is told to stop taking connections and finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainBy {
    /// A message on its channel (DRAIN; Node's disconnect).
    Message,
    /// Its stop signal, sent by the supervisor.
    Signal,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Native => "native",
            Mode::Node => "node",
            Mode::Shim => "shim",
            Mode::Shared => "shared",
            Mode::Proxy => "proxy",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_detected_and_needs_a_script() {
        assert_eq!(Mode::detect(Path::new("/usr/bin/node")), Mode::Node);
        assert_eq!(Mode::detect(Path::new("nodejs")), Mode::Node);
        assert_eq!(Mode::detect(Path::new("/usr/bin/python3")), Mode::Native);
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(Mode::Node.check_args(&args(&["app.js"])).is_ok());
        assert!(
            Mode::Node
                .check_args(&args(&["--inspect", "app.js", "-e"]))
                .is_ok()
        );
        assert!(Mode::Node.check_args(&args(&["-e", "x"])).is_err());
        assert!(Mode::Node.check_args(&args(&[])).is_err());
        assert!(Mode::Native.check_args(&args(&[])).is_ok());
        assert_eq!(Mode::parse(" Node "), Some(Mode::Node));
        assert_eq!(Mode::parse("shim"), Some(Mode::Shim));
        assert_eq!(Mode::parse("fast"), None);
    }
}
