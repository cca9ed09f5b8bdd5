//! What travels over the control socket: one JSON line each way.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Whether the supervisor answers, and how many workers are ready
    /// (`/livez`, `/readyz`); needs nothing of the dispatcher.
    Health,
    /// Re-read the configuration and replace every worker, one at a time,
    /// each only once its successor is ready (as SIGHUP does). Answered when
    /// it ends.
    Reload,
    /// Drain every worker and exit, as SIGTERM does.
    Stop,
    /// Run `count` workers, or `count` more (fewer, if negative) when
    /// `relative`, in pool `pool` (absent: the only one).
    Scale {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
        count: i64,
        relative: bool,
    },
    /// Replace the workers `target` names (a slot number, a pool's name,
    /// `all`), one at a time, each only once its successor is ready.
    /// Answered when every one has switched; with `wait`, once the
    /// replaced workers have drained and exited.
    Restart {
        target: String,
        #[serde(default)]
        wait: bool,
    },
    /// Re-execute the master in place with the binary at the path it was
    /// started as, keeping listeners and workers (as SIGUSR2 does).
    /// Answered once the new binary passed its check and the master is
    /// about to exec it, or refused.
    Upgrade,
    /// A user message to one slot's worker, or to all when `slot` is absent.
    Send {
        slot: Option<usize>,
        message: String,
    },
}

impl Request {
    /// Whether the master answers only once work it starts is done (a
    /// reload, a restart), which may take long.
    pub fn answered_when_done(&self) -> bool {
        matches!(
            self,
            Request::Reload | Request::Restart { .. } | Request::Upgrade
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

impl Response {
    pub fn done(message: String) -> Response {
        Response {
            ok: true,
            message: Some(message),
            ..Response::default()
        }
    }

    pub fn error(error: String) -> Response {
        Response {
            ok: false,
            error: Some(error),
            ..Response::default()
        }
    }
}

/// Whether the master should get traffic (`/readyz`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Workers that said READY and are neither stalled nor draining.
    pub ready: usize,
    pub min_ready: usize,
    /// Worker slots configured.
    pub slots: usize,
    /// Draining (or killing) its workers on the way out.
    pub stopping: bool,
}

/// The master and every worker (what `lb status` shows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// Every listener, comma-separated.
    pub listen: String,
    /// Each listener, in configured order.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    pub policy: String,
    /// `master` (lb hands connections on) or `kernel` (a BPF program picks).
    #[serde(default)]
    pub dispatch: String,
    pub uptime_s: f64,
    /// lb's version.
    #[serde(default)]
    pub version: String,
    /// In-place upgrades (`lb upgrade`) since lb started.
    #[serde(default)]
    pub upgrades: u64,
    /// The binary `lb upgrade` runs: the path lb was started as.
    #[serde(default)]
    pub exe: String,
    /// Draining (or killing) its workers on the way out.
    #[serde(default)]
    pub stopping: bool,
    /// Workers that must be ready for `/readyz` to answer 200.
    #[serde(default)]
    pub min_ready: usize,
    /// The pools as configured now, in slot order.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
    /// The master process itself.
    #[serde(default)]
    pub process: ProcessStatus,
    pub accepted: u64,
    pub dispatched: u64,
    /// The CONN messages that carried them to lb-protocol workers: fewer
    /// than connections when workers take several per CONN (`BATCH`).
    #[serde(default)]
    pub conn_messages: u64,
    pub rescued: u64,
    /// Times accepting paused because no worker had room.
    pub paused: u64,
    /// Proxy mode: connects to a worker not done within the connect
    /// timeout (each client went to another worker).
    #[serde(default)]
    pub proxy_connect_timeouts: u64,
    /// Proxy mode: relays reset after the idle timeout without a byte moved.
    #[serde(default)]
    pub proxy_idle_timeouts: u64,
    /// The PROXY protocol (`proxy_protocol`): headers read, and connections
    /// closed over theirs.
    #[serde(default)]
    pub proxy_headers: ProxyHeaders,
    /// Hand-off latency: (upper bound in seconds, connections at or under it).
    pub latency_buckets: Vec<(f64, u64)>,
    pub latency_count: u64,
    pub latency_sum_s: f64,
    pub workers: Vec<WorkerStatus>,
}

/// PROXY protocol headers read and refused (`docs/proxy-protocol.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyHeaders {
    /// Headers read, by version.
    pub v1: u64,
    pub v2: u64,
    /// Of those, `LOCAL` (v2) or `UNKNOWN` (v1) ones: served, with no
    /// client address.
    pub local: u64,
    /// Connections from outside `proxy_trusted` served as direct clients.
    pub untrusted_served: u64,
    /// Connections closed, by reason: malformed, oversized, timeout,
    /// untrusted, closed (the client, before its header was complete), full.
    pub failures: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `HOST:PORT`, `[IPv6]:PORT` or `unix:/PATH`.
    pub address: String,
    /// Connections lb accepted from it; `null` in shared mode and under
    /// kernel dispatch, where the workers accept.
    pub accepted: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub mode: String,
    /// Its slots.
    pub count: usize,
    pub weight: u32,
}

/// The master's own use of the machine; `None` (`null`) where unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time_s: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    /// The pool the worker was started for.
    #[serde(default)]
    pub pool: String,
    /// None while the slot waits to restart.
    pub pid: Option<u32>,
    pub generation: u64,
    /// starting, ready, stalled, draining, restarting
    pub state: String,
    pub uptime_s: f64,
    pub restarts: u64,
    /// Open connections; `None` (JSON `null`) when unknown: the policy
    /// reads no close reports and the worker sent none, or shared mode.
    pub active: Option<u64>,
    pub total: u64,
    /// Average CPU use since start, percent of one core.
    pub cpu_percent: f64,
    /// CPU seconds used since start (user and system).
    #[serde(default)]
    pub cpu_s: f64,
    pub rss_bytes: u64,
}
