//! systemd integration: readiness notifications (`sd_notify`) and socket
//! activation (`LISTEN_FDS`). Both are plain protocols over the
//! environment; no library needed.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;

/// Environment variables of these protocols, which workers must not inherit
/// (they are the master's, not theirs).
pub const VARS: [&str; 4] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

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

/// The listening socket systemd passed (fd 3), if `LISTEN_PID` is this
/// process and `LISTEN_FDS` is at least 1; checked before it is trusted.
pub fn activated_listener() -> io::Result<Option<TcpListener>> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok());
    match (pid, fds) {
        (Some(pid), Some(n)) if pid == std::process::id() && n >= 1 => {
            crate::sys::inherited_listener(3).map(Some)
        }
        _ => Ok(None),
    }
}
