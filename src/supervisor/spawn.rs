//! Starting one worker process: its channel on fd 3, its environment, its
//! output piped to lb, its own process group, death with the master.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use crate::config::Pool;
use crate::policy::Slot;
use crate::proto::{self, VERSION, WORKER_FD, env};
use crate::sys;

/// A started worker and the master's handles on it.
pub struct Spawned {
    pub child: Child,
    pub pidfd: OwnedFd,
    /// The master's end of the channel (non-blocking).
    pub channel: OwnedFd,
    /// The master's copy of the worker's end (for rescue).
    pub peer: OwnedFd,
    /// The read ends of the worker's stdout and stderr.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The command line, for logs.
pub fn describe_command(pool: &Pool) -> String {
    std::iter::once(pool.command.display().to_string())
        .chain(pool.args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts `pool`'s command as the worker in `slot`. `Command::spawn` returns
/// only after exec succeeded (or with exec's error), so an `Ok` is "online".
pub fn spawn(pool: &Pool, slot: Slot, generation: u64, report_closed: bool) -> io::Result<Spawned> {
    let (channel, peer) = proto::pair()?;
    let mut cmd = Command::new(&pool.command);
    cmd.args(&pool.args)
        .envs(pool.env.iter().map(|(k, v)| (k, v)))
        .env(env::FD, WORKER_FD.to_string())
        .env(env::WORKER_ID, slot.0.to_string())
        .env(env::GENERATION, generation.to_string())
        .env(env::PROTOCOL, VERSION.to_string())
        .env(env::REPORT_CLOSED, if report_closed { "1" } else { "0" })
        .stdin(Stdio::null())
        // The master's systemd variables are not the worker's.
        .env_remove(crate::systemd::VARS[0])
        .env_remove(crate::systemd::VARS[1])
        .env_remove(crate::systemd::VARS[2])
        .env_remove(crate::systemd::VARS[3])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    sys::prepare_child(&mut cmd, peer.as_raw_fd(), WORKER_FD);
    let mut child = cmd.spawn()?;
    let pidfd = match sys::pidfd_open(child.id()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    nix::fcntl::fcntl(
        &channel,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
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
