//! Who picks each connection's worker: lb's master, or the kernel
//! (`dispatch::kernel`, `docs/kernel-dispatch.md`).

use super::{Config, ConfigError, Mode};
use crate::policy::PolicyKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// The master accepts, picks and hands each connection on.
    #[default]
    Master,
    /// A program in the kernel picks each worker's own listener; lb is
    /// not on the accept path. Every mode but proxy.
    Kernel,
    /// Kernel where it can be (no proxy pool, a policy the workers can
    /// feed, the program loads), the master otherwise, said in one line.
    Auto,
}

impl Dispatch {
    pub const CHOICES: &'static str = "use master, kernel or auto";

    pub fn parse(text: &str) -> Option<Dispatch> {
        match text.trim().to_ascii_lowercase().as_str() {
            "master" => Some(Dispatch::Master),
            "kernel" | "reuseport" => Some(Dispatch::Kernel),
            "auto" => Some(Dispatch::Auto),
            _ => None,
        }
    }

    /// Why `config` cannot have the kernel pick, if it cannot: the workers
    /// must accept from listeners of their own. Shared-mode workers do
    /// (fd 3), Node workers do when lb answers their `listen()` with one
    /// (as Node's primary does under `SCHED_NONE`), lb-protocol workers
    /// and the shim take one as LISTENER; a proxy worker listens on a port
    /// of its own, which lb relays to. Least-connections needs the workers'
    /// counts, which shared-mode workers do not report.
    pub fn kernel_refusal(config: &Config) -> Option<String> {
        if let Some(l) = config.listeners.iter().find(|l| l.reads_proxy_headers()) {
            return Some(format!(
                "proxy_protocol is {} on {}, and under kernel dispatch the workers accept \
                 connections themselves, PROXY header and all, which only lb can read and \
                 remove: use --dispatch master, or proxy_protocol off",
                l.proxy.protocol, l.address
            ));
        }
        if config.listeners.len() > 1 {
            return Some(format!(
                "lb listens on {} addresses, and kernel dispatch steers one TCP listener's \
                 connections: use --dispatch master, or one --listen",
                config.listeners.len()
            ));
        }
        if let Some(l) = config.listeners.iter().find(|l| l.address.tcp().is_none()) {
            return Some(format!(
                "{} is a Unix socket, and the kernel's SO_REUSEPORT steering is for TCP: use \
                 --dispatch master, or a TCP --listen",
                l.address
            ));
        }
        if let Some(p) = config.pools.iter().find(|p| p.mode == Mode::Proxy) {
            return Some(format!(
                "pool `{}` is mode proxy, and the kernel can only hand connections to workers \
                 that accept from listeners of their own: use another mode, or --dispatch master",
                p.name
            ));
        }
        if config.policy == PolicyKind::LeastConn
            && let Some(p) = config.pools.iter().find(|p| p.mode == Mode::Shared)
        {
            return Some(format!(
                "policy least-conn needs each worker's open connections, which pool `{}`'s \
                 shared-mode workers do not report: use rr or wrr, another mode, or --dispatch \
                 master",
                p.name
            ));
        }
        None
    }

    /// Refuses `--dispatch kernel` for what it cannot do (auto falls back).
    pub fn check(config: &Config) -> Result<(), ConfigError> {
        match (config.dispatch, Dispatch::kernel_refusal(config)) {
            (Dispatch::Kernel, Some(why)) => {
                Err(ConfigError::Conflict(format!("--dispatch kernel: {why}")))
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dispatch::Master => "master",
            Dispatch::Kernel => "kernel",
            Dispatch::Auto => "auto",
        })
    }
}
