//! Starting one worker process: its channel on fd 3, its environment, its
//! output piped to lb, its own process group, death with the master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::config::{ChannelKind, Mode, Pool};
use crate::policy::Slot;
use crate::proto::{self, VERSION, WORKER_FD, env, node};
use crate::sys;

/// What a worker is told beyond its pool's own command and environment.
pub struct Launch<'a> {
    pub slot: Slot,
    pub generation: u64,
    /// The policy reads close reports (native: `LB_REPORT_CLOSED=1`; node:
    /// the preload at `node_preload` is required).
    pub report_closed: bool,
    /// Node's `cluster.worker.id`: unique per process, from 1.
    pub node_id: u64,
    pub node_preload: Option<&'a Path>,
    /// lb's port (what `{port}` in the arguments becomes, and the port the
    /// shim takes over unless the pool names another).
    pub port: u16,
    /// Shim mode: the in-memory shim.
    pub shim: Option<&'a crate::shim::Memfd>,
    /// Shared mode: the listener, passed as fd 3.
    pub listener: Option<std::os::fd::RawFd>,
    /// Proxy mode: the loopback port the worker is to listen on.
    pub proxy_port: Option<u16>,
    /// How long the worker may take to drain (it is told, to fit in it).
    pub drain_timeout: std::time::Duration,
    /// Connections that may wait in its channel (lb's protocol): the
    /// master's end gets a send buffer that holds that many and no more.
    pub queue: usize,
}

/// A started worker and the master's handles on it.
pub struct Spawned {
    pub child: Child,
    pub pidfd: OwnedFd,
    /// The master's end of the channel (non-blocking), if the mode has one.
    pub channel: Option<OwnedFd>,
    /// The master's copy of the worker's end, if the mode keeps one
    /// (`Mode::keeps_peer`).
    pub peer: Option<OwnedFd>,
    /// The read ends of the worker's stdout and stderr.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What one CONN (16 bytes and an fd) costs a channel's send buffer: the
/// kernel's overhead per message, measured once (768 bytes on x86_64 Linux
/// 6.x; that, if it cannot be measured).
pub fn message_cost() -> usize {
    static COST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        let measured = || -> io::Result<usize> {
            let (master, _worker) = proto::pair()?;
            let (carried, _) = nix::unistd::pipe()?;
            proto::send_conn(master.as_fd(), carried.as_fd(), 1)?;
            sys::unread_bytes(master.as_fd())
        };
        measured().ok().filter(|&n| n > 0).unwrap_or(768)
    })
}

/// The command line, for logs.
pub fn describe_command(pool: &Pool) -> String {
    std::iter::once(pool.command.display().to_string())
        .chain(pool.args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts `pool`'s command as the worker in `launch.slot`. `Command::spawn`
/// returns only after exec succeeded (or with exec's error), so an `Ok` is
/// "online".
pub fn spawn(pool: &Pool, launch: &Launch<'_>) -> io::Result<Spawned> {
    let (channel, peer) = match pool.mode.channel() {
        ChannelKind::Packets => proto::pair().map(|(c, p)| (Some(c), Some(p)))?,
        ChannelKind::Stream => proto::stream_pair().map(|(c, p)| (Some(c), Some(p)))?,
        ChannelKind::None => (None, None),
    };
    let port = match pool.mode {
        Mode::Shim => pool.port.unwrap_or(launch.port),
        Mode::Proxy => launch
            .proxy_port
            .ok_or_else(|| io::Error::other("proxy mode without a port"))?,
        _ => launch.port,
    };
    if let (ChannelKind::Packets, Some(channel)) = (pool.mode.channel(), &channel) {
        // The kernel doubles what is asked for, and charges each message
        // its buffer overhead: this many CONNs fit, then EAGAIN, and the
        // dispatcher skips the worker until it reads.
        let bytes = launch.queue.saturating_mul(message_cost()) / 2;
        socket2::SockRef::from(channel).set_send_buffer_size(bytes)?;
    }
    let port_text = port.to_string();
    let mut cmd = Command::new(&pool.command);
    cmd.args(pool.args.iter().map(|a| match a.to_str() {
        Some(s) if s.contains("{port}") => s.replace("{port}", &port_text).into(),
        _ => a.clone(),
    }))
    .envs(pool.env.iter().map(|(k, v)| (k, v)))
    .env(env::WORKER_ID, launch.slot.0.to_string())
    .env(env::GENERATION, launch.generation.to_string())
    .env(
        env::DRAIN_TIMEOUT_MS,
        launch.drain_timeout.as_millis().to_string(),
    )
    .stdin(Stdio::null())
    // The master's systemd variables are not the worker's.
    .env_remove(crate::systemd::VARS[0])
    .env_remove(crate::systemd::VARS[1])
    .env_remove(crate::systemd::VARS[2])
    .env_remove(crate::systemd::VARS[3])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    match pool.mode {
        Mode::Native => {
            cmd.env(env::FD, WORKER_FD.to_string())
                .env(env::PROTOCOL, VERSION.to_string())
                .env(
                    env::REPORT_CLOSED,
                    if launch.report_closed { "1" } else { "0" },
                );
        }
        Mode::Shim => {
            let shim = launch
                .shim
                .ok_or_else(|| io::Error::other("shim mode without the shim"))?;
            let theirs = pool
                .env
                .iter()
                .find(|(k, _)| k == crate::shim::env::PRELOAD)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(crate::shim::env::PRELOAD).ok());
            cmd.env(env::FD, WORKER_FD.to_string())
                .env(env::PROTOCOL, VERSION.to_string())
                .env(
                    env::REPORT_CLOSED,
                    if launch.report_closed { "1" } else { "0" },
                )
                .env(crate::shim::env::PORT, &port_text)
                .env(crate::shim::env::STOP_SIGNAL, pool.stop_signal.to_string())
                .env(crate::shim::env::FD, shim.raw().to_string())
                .env(crate::shim::env::PRELOAD, shim.preload(theirs.as_deref()));
            sys::keep_fd(&mut cmd, shim.raw());
        }
        Mode::Proxy => {
            cmd.env("PORT", &port_text);
        }
        Mode::Shared => {
            // systemd's socket activation and einhorn's variables; the
            // child sets LISTEN_PID to its own pid before exec (below).
            cmd.env("LISTEN_FDS", "1")
                .env("LISTEN_FDNAMES", &pool.name)
                .env("EINHORN_FD_COUNT", "1")
                .env("EINHORN_FD_0", WORKER_FD.to_string());
        }
        Mode::Node => {
            cmd.env(node::env::UNIQUE_ID, launch.node_id.to_string())
                .env(node::env::CHANNEL_FD, WORKER_FD.to_string())
                .env(node::env::SERIALIZATION, "json");
            if let Some(preload) = launch.node_preload {
                let mut options = format!("--require \"{}\"", preload.display());
                let theirs = pool
                    .env
                    .iter()
                    .find(|(k, _)| k == node::env::OPTIONS)
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var(node::env::OPTIONS).ok());
                if let Some(theirs) = theirs.filter(|t| !t.trim().is_empty()) {
                    options = format!("{theirs} {options}");
                }
                cmd.env(node::env::OPTIONS, options);
            }
        }
    }
    match (pool.mode, launch.listener) {
        (Mode::Shared, Some(listener)) => {
            sys::prepare_child(&mut cmd, Some(listener), WORKER_FD);
            sys::exec_with_own_pid(&mut cmd, "LISTEN_PID")?;
        }
        (Mode::Shared, None) => return Err(io::Error::other("shared mode without the listener")),
        _ => sys::prepare_child(&mut cmd, peer.as_ref().map(|p| p.as_raw_fd()), WORKER_FD),
    }
    let mut child = cmd.spawn()?;
    let pidfd = match sys::pidfd_open(child.id()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    if let Some(channel) = &channel {
        nix::fcntl::fcntl(
            channel,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
    }
    let peer = peer.filter(|_| pool.mode.keeps_peer());
    let stdout = OwnedFd::from(child.stdout.take().expect("piped"));
    let stderr = OwnedFd::from(child.stderr.take().expect("piped"));
    Ok(Spawned {
        child,
        pidfd,
        channel,
        peer,
        stdout,
        stderr,
    })
}

/// A loopback port free now, for a proxy-mode worker to listen on (the
/// kernel's choice, so it does not collide with lb's own or another's).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// "exit code 3", "killed by SIGKILL".
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("{status}")
    }
}
