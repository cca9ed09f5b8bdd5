//! Each mode's part of a worker's launch: the port `{port}` in its
//! arguments becomes, the environment it adds, and what it gets as fd 3.
//! One function per mode; `set_up` picks it.

use std::io;
use std::os::fd::RawFd;
use std::process::Command;

use super::spawn::Launch;
use crate::config::{Mode, Pool};
use crate::proto::{VERSION, WORKER_FD, env, node};
use crate::sys;

/// What a mode adds to a worker's launch besides its environment.
pub(super) struct ModeLaunch {
    /// What `{port}` in the arguments becomes.
    pub port: u16,
    pub fd3: Fd3,
}

/// What a worker gets as fd 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fd3 {
    /// Its end of the channel, if its mode has one.
    Channel,
    /// The shared listeners, as fds 3 on; the child sets `LISTEN_PID` to
    /// its own pid before exec.
    Listeners(Vec<RawFd>),
}

/// Adds what `pool`'s mode needs to `cmd`.
pub(super) fn set_up(
    cmd: &mut Command,
    pool: &Pool,
    launch: &Launch<'_>,
) -> io::Result<ModeLaunch> {
    if pool.mode != Mode::Node && Mode::detect(&pool.command) == Mode::Node {
        node_app_instance(cmd, launch);
    }
    match pool.mode {
        Mode::Native => Ok(native(cmd, launch)),
        Mode::Shim => shim(cmd, pool, launch),
        Mode::Node => Ok(node(cmd, pool, launch)),
        Mode::Proxy => proxy(cmd, launch),
        Mode::Shared => shared(cmd, pool, launch),
    }
}

/// lb's protocol on fd 3 (native workers, and the shim in a server).
fn lb_protocol(cmd: &mut Command, launch: &Launch<'_>) {
    cmd.env(env::FD, WORKER_FD.to_string())
        .env(env::PROTOCOL, VERSION.to_string())
        .env(
            env::REPORT_CLOSED,
            if launch.report_closed { "1" } else { "0" },
        )
        .env(
            env::OWN_LISTENER,
            if launch.own_listener { "1" } else { "0" },
        );
}

fn native(cmd: &mut Command, launch: &Launch<'_>) -> ModeLaunch {
    lb_protocol(cmd, launch);
    ModeLaunch {
        port: launch.port,
        fd3: Fd3::Channel,
    }
}

/// The accept shim, preloaded in front of any preload the server has, and
/// the port whose listener it takes over.
fn shim(cmd: &mut Command, pool: &Pool, launch: &Launch<'_>) -> io::Result<ModeLaunch> {
    let shim = launch
        .shim
        .ok_or_else(|| io::Error::other("shim mode without the shim"))?;
    let port = pool.port.unwrap_or(launch.port);
    let theirs = inherited(pool, crate::shim::env::PRELOAD);
    lb_protocol(cmd, launch);
    cmd.env(crate::shim::env::PORT, port.to_string())
        .env(crate::shim::env::STOP_SIGNAL, pool.stop_signal.to_string())
        .env(crate::shim::env::FD, shim.raw().to_string())
        .env(crate::shim::env::PRELOAD, shim.preload(theirs.as_deref()));
    sys::keep_fd(cmd, shim.raw());
    Ok(ModeLaunch {
        port,
        fd3: Fd3::Channel,
    })
}

/// A Node.js cluster worker's variables, and the preload after any options
/// the worker has (told what to do when addresses are among it: closes
/// alone is what it does untold).
fn node(cmd: &mut Command, pool: &Pool, launch: &Launch<'_>) -> ModeLaunch {
    node_app_instance(cmd, launch);
    cmd.env(
        env::OWN_LISTENER,
        if launch.own_listener { "1" } else { "0" },
    )
    .env(node::env::UNIQUE_ID, launch.node_id.to_string())
    .env(node::env::CHANNEL_FD, WORKER_FD.to_string())
    .env(node::env::SERIALIZATION, "json");
    if let Some(preload) = launch.node_preload {
        let mut options = format!("--require \"{}\"", preload.display());
        let theirs = inherited(pool, node::env::OPTIONS);
        if let Some(theirs) = theirs.filter(|t| !t.trim().is_empty()) {
            options = format!("{theirs} {options}");
        }
        cmd.env(node::env::OPTIONS, options);
        if launch.proxy_protocol {
            let wants = if launch.report_closed {
                "addresses,closes"
            } else {
                "addresses"
            };
            cmd.env(node::env::PRELOAD_WANTS, wants);
        }
    }
    ModeLaunch {
        port: launch.port,
        fd3: Fd3::Channel,
    }
}

/// The loopback port the worker is to listen on.
fn proxy(cmd: &mut Command, launch: &Launch<'_>) -> io::Result<ModeLaunch> {
    let port = launch
        .proxy_port
        .ok_or_else(|| io::Error::other("proxy mode without a port"))?;
    cmd.env("PORT", port.to_string());
    Ok(ModeLaunch {
        port,
        fd3: Fd3::Channel,
    })
}

/// lb's listener as fd 3, with systemd's socket-activation variables and
/// einhorn's.
fn shared(cmd: &mut Command, pool: &Pool, launch: &Launch<'_>) -> io::Result<ModeLaunch> {
    if launch.listeners.is_empty() {
        return Err(io::Error::other("shared mode without the listener"));
    }
    let n = launch.listeners.len();
    let names: Vec<&str> = launch
        .listeners
        .iter()
        .map(|(_, name)| name.unwrap_or(&pool.name))
        .collect();
    cmd.env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("EINHORN_FD_COUNT", n.to_string());
    for i in 0..n {
        cmd.env(
            format!("EINHORN_FD_{i}"),
            (WORKER_FD + i as RawFd).to_string(),
        );
    }
    Ok(ModeLaunch {
        port: launch.port,
        fd3: Fd3::Listeners(launch.listeners.iter().map(|(fd, _)| *fd).collect()),
    })
}

/// What PM2 tells each of an app's instances (0 to count − 1), which
/// Node apps (and the `config` package) read to tell them apart.
pub(super) const NODE_APP_INSTANCE: &str = "NODE_APP_INSTANCE";

/// PM2's variable, for Node workers: node mode, or a `node` command in any
/// other mode (a server on a port of its own, say).
pub(super) fn node_app_instance(cmd: &mut Command, launch: &Launch<'_>) {
    cmd.env(NODE_APP_INSTANCE, launch.instance.to_string());
}

/// `key` as the worker would have it: its pool's, else lb's own.
fn inherited(pool: &Pool, key: &str) -> Option<String> {
    pool.env
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var(key).ok())
}
