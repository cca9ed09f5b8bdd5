//! systemd integration: readiness, status and watchdog notifications
//! (`sd_notify`) and socket activation (`LISTEN_FDS`). All are plain
//! protocols over the environment; no library needed.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

/// Environment variables of these protocols, which workers must not inherit
/// (they are the master's, not theirs).
pub const VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=` (systemd's
/// advice), if systemd set `$WATCHDOG_USEC` for this process (`$WATCHDOG_PID`
/// unset or this pid).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(std::time::Duration::from_micros(usec / 2))
}

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET` if set; silently does
/// nothing otherwise. A leading `@` names an abstract socket.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let _ = send(&path, state);
}

fn send(path: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// `RELOADING=1` with the timestamp systemd's `Type=notify-reload` asks for.
pub fn reloading() -> String {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    format!("RELOADING=1\nMONOTONIC_USEC={now}")
}

/// The most sockets lb takes from systemd.
const MAX_ACTIVATED: i32 = 1024;

/// The listening sockets systemd passed (fds 3 on), each with its name
/// from `LISTEN_FDNAMES` (`FileDescriptorName=`; systemd's default is the
/// socket unit's name), if `LISTEN_PID` is this process; each is checked
/// before it is trusted. Empty without socket activation.
pub fn activated_listeners() -> io::Result<Vec<(OwnedFd, Option<String>)>> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok());
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names
        .split(':')
        .map(|n| Some(n.to_string()).filter(|n| !n.is_empty()));
    match (pid, fds) {
        (Some(pid), Some(n)) if pid == std::process::id() && n > MAX_ACTIVATED => {
            Err(io::Error::other(format!(
                "LISTEN_FDS={n} is more than the {MAX_ACTIVATED} sockets lb takes; pass fewer"
            )))
        }
        (Some(pid), Some(n)) if pid == std::process::id() && n >= 1 => (0..n)
            .map(|i| {
                Ok((
                    crate::sys::inherited_listener(3 + i)?,
                    names.next().flatten(),
                ))
            })
            .collect(),
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout_and_only_by_its_pid() {
        let ms = Duration::from_millis;
        assert_eq!(watchdog_from(Some("30000000"), None, 7), Some(ms(15_000)));
        assert_eq!(watchdog_from(Some("200000"), Some("7"), 7), Some(ms(100)));
        assert_eq!(
            watchdog_from(Some("200000"), Some("8"), 7),
            None,
            "another's"
        );
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
        for bad in ["0", "", "soon", "-5"] {
            assert_eq!(watchdog_from(Some(bad), None, 7), None, "{bad:?}");
        }
    }
}
