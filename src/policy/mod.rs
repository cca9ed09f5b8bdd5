//! Scheduling strategies behind one small trait: a slice of worker views in,
//! a slot out. Policies never make syscalls and never allocate in `pick`.
//!
//! Adding a policy is one file here and one arm in [`PolicyKind`].

mod least_conn;
mod round_robin;
mod weighted;

pub use least_conn::LeastConn;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use std::fmt;
use std::str::FromStr;

/// A worker's stable position, 0..N-1; indexes every per-worker array.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub usize);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a policy may know about one worker. Kept up to date in place by the
/// dispatcher, one entry per slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerView {
    /// Ready, not draining, and its channel had room at last try.
    pub eligible: bool,
    /// Relative share of connections (≥ 1).
    pub weight: u32,
    /// Connections sent and not yet reported closed.
    pub active: u32,
}

/// A scheduling strategy.
pub trait Policy: Send {
    /// Picks one eligible worker, or `None` when none is eligible.
    /// O(workers), no allocation.
    fn pick(&mut self, workers: &[WorkerView]) -> Option<Slot>;

    /// Called (off the hot path) whenever the number of slots changes, so
    /// that per-slot state is sized before the next `pick`.
    fn resize(&mut self, _slots: usize) {}
}

/// The policies a user can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    RoundRobin,
    Weighted,
    LeastConn,
}

impl PolicyKind {
    /// The canonical name, as accepted by `--policy` and shown in logs.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::Weighted => "weighted",
            PolicyKind::LeastConn => "least-conn",
        }
    }

    /// Whether the policy reads the workers' CLOSED reports (workers are
    /// told, and may skip them otherwise).
    pub fn uses_close_reports(self) -> bool {
        matches!(self, PolicyKind::LeastConn)
    }

    /// Builds the strategy, sized for `slots` workers.
    pub fn build(self, slots: usize) -> Box<dyn Policy> {
        let mut policy: Box<dyn Policy> = match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::Weighted => Box::new(SmoothWeighted::default()),
            PolicyKind::LeastConn => Box::new(LeastConn::default()),
        };
        policy.resize(slots);
        policy
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The one-line reason a policy name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy `{0}`; use rr (round-robin), wrr (weighted) or lc (least-conn)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "rr" | "round-robin" | "roundrobin" => Ok(PolicyKind::RoundRobin),
            "wrr" | "weighted" | "weighted-round-robin" => Ok(PolicyKind::Weighted),
            "lc" | "least-conn" | "leastconn" | "least-connections" => Ok(PolicyKind::LeastConn),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

/// Test helper: `n` eligible workers of weight 1 and no connections.
#[cfg(test)]
pub(crate) fn views(n: usize) -> Vec<WorkerView> {
    vec![
        WorkerView {
            eligible: true,
            weight: 1,
            active: 0
        };
        n
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse_case_insensitively() {
        for (s, k) in [
            ("rr", PolicyKind::RoundRobin),
            ("Round-Robin", PolicyKind::RoundRobin),
            ("WRR", PolicyKind::Weighted),
            ("weighted", PolicyKind::Weighted),
            ("lc", PolicyKind::LeastConn),
            ("LEAST-CONN", PolicyKind::LeastConn),
            ("least_conn", PolicyKind::LeastConn),
        ] {
            assert_eq!(s.parse::<PolicyKind>(), Ok(k), "{s}");
        }
        let err = "fastest".parse::<PolicyKind>().unwrap_err();
        assert!(err.to_string().contains("`fastest`"));
        assert!(err.to_string().contains("rr"));
    }

    #[test]
    fn only_least_conn_reads_close_reports() {
        assert!(PolicyKind::LeastConn.uses_close_reports());
        assert!(!PolicyKind::RoundRobin.uses_close_reports());
        assert!(!PolicyKind::Weighted.uses_close_reports());
    }

    #[test]
    fn every_kind_builds_and_picks() {
        for k in [
            PolicyKind::RoundRobin,
            PolicyKind::Weighted,
            PolicyKind::LeastConn,
        ] {
            let mut p = k.build(3);
            assert!(p.pick(&views(3)).is_some(), "{k}");
            assert_eq!(p.pick(&[]), None, "{k}");
            assert_eq!(k.name().parse::<PolicyKind>(), Ok(k));
        }
    }
}
