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
    /// not on the accept path. Shared mode, round-robin or weighted.
    Kernel,
    /// Kernel where it can be (shared mode, a policy it runs, the program
    /// loads), the master otherwise, said in one line.
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
    /// must accept from listeners of their own, which shared-mode workers
    /// do (fd 3) and Node workers do when lb answers their `listen()` with
    /// one (as Node's primary does under `SCHED_NONE`).
    pub fn kernel_refusal(config: &Config) -> Option<String> {
        let first = config.pools.first().map_or(Mode::Shared, |p| p.mode);
        if let Some(p) = config
            .pools
            .iter()
            .find(|p| !matches!(p.mode, Mode::Shared | Mode::Node) || p.mode != first)
        {
            return Some(format!(
                "pool `{}` is mode {}, and the kernel can only hand connections to workers that \
                 accept from listeners of their own: use mode shared or node (every pool the \
                 same), or --dispatch master",
                p.name, p.mode
            ));
        }
        if config.policy == PolicyKind::LeastConn {
            return Some(
                "policy least-conn is not in the kernel's program (it picks by a schedule, not \
                 by open connections): use rr or wrr, or --dispatch master"
                    .into(),
            );
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
