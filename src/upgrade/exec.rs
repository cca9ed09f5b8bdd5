//! The exec itself, and the paths around it.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{STATE_VAR, State};

/// Not passed on: the state says what systemd passed, and the next image
/// must not take fds 3 on for sockets.
const DROPPED: [&str; 4] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", STATE_VAR];

static STARTED_AS: OnceLock<PathBuf> = OnceLock::new();

/// The path lb was started as (a symlink kept a symlink, so a package that
/// moves it to a new version's file upgrades to that), found once at start
/// from `argv[0]` and `PATH`; an image started by an upgrade is told it.
pub fn started_as() -> &'static Path {
    STARTED_AS.get_or_init(|| {
        let argv0 = std::env::args_os().next().map(PathBuf::from);
        let found = argv0.and_then(|a| {
            if a.components().count() > 1 {
                // (`components` drops the `.` of `./lb`.)
                std::env::current_dir()
                    .ok()
                    .map(|d| d.join(&a).components().collect())
            } else {
                std::env::var_os("PATH").and_then(|path| {
                    std::env::split_paths(&path)
                        .map(|d| d.join(&a))
                        .find(|p| p.is_file())
                })
            }
        });
        found
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
    })
}

/// An image started by an upgrade: the path its first image was started as.
pub fn set_started_as(path: PathBuf) {
    let _ = STARTED_AS.set(path);
}

/// Replaces this process's image with `binary`, `state` written to an fd
/// it inherits with every fd the state names. Returns only if the exec
/// failed (everything is still open and owned by the caller then).
pub fn exec(binary: &OwnedFd, state: &State) -> io::Error {
    let memfd = match state.write() {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let mut kept: Vec<RawFd> = state.fds();
    kept.push(std::os::fd::AsRawFd::as_raw_fd(&memfd));
    for &fd in &kept {
        if let Err(e) = crate::sys::inheritable(fd) {
            return e;
        }
    }
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_vec()).ok())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !DROPPED.iter().any(|d| k == *d))
        .filter_map(|(k, v)| {
            let mut kv: OsString = k;
            kv.push("=");
            kv.push(v);
            CString::new(kv.into_vec()).ok()
        })
        .collect();
    if let Ok(var) = CString::new(format!(
        "{STATE_VAR}={}",
        std::os::fd::AsRawFd::as_raw_fd(&memfd)
    )) {
        env.push(var);
    }
    let err = match nix::unistd::fexecve(binary.as_fd(), &args, &env) {
        Ok(never) => match never {},
        Err(e) => io::Error::from(e),
    };
    // Still this image: its fds are its own again, for its children too.
    for &fd in &kept {
        let _ = crate::sys::keep_private(fd);
    }
    err
}

/// What the master itself holds for the next image, besides the
/// supervisor's `Carry`.
pub struct Kept {
    /// Per listener, in order: the file lb made, the name systemd gave.
    pub listeners: Vec<super::state::Listener>,
    pub activated: bool,
    pub control: crate::control::Server,
    pub metrics: Option<OwnedFd>,
    /// The Unix socket files lb made: left in place for the next image.
    pub made: crate::listeners::Made,
}

/// Answers the request (if any), gives up the control socket, and execs
/// the checked binary; if that fails, this image's own binary, so that the
/// workers and listeners are kept either way. Returns only if both failed.
pub fn carry_out(carry: crate::supervisor::Carry, kept: Kept) -> io::Error {
    let crate::supervisor::Carry {
        mut state,
        binary,
        version,
        fds,
        reply,
    } = carry;
    for (l, k) in state.listeners.iter_mut().zip(kept.listeners) {
        l.made = k.made;
        l.name = k.name;
    }
    state.activated = kept.activated;
    let pid = std::process::id();
    let said = format!(
        "re-executing {} (lb {version}) as master pid {pid}, keeping {} workers",
        state.exe.display(),
        state.workers.len()
    );
    if let Some(r) = reply {
        let _ = r.send(crate::supervisor::Answer::Done(said.clone()));
    }
    let control = kept.control.hand_over();
    state.control = control.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    state.metrics = kept.metrics.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    kept.made.keep();
    crate::info!("upgrade: {said}");
    crate::log::flush(std::time::Duration::from_secs(2));
    let err = exec(&binary, &state);
    crate::warn!("upgrade: cannot exec the new binary ({err}); re-executing this image's own");
    crate::log::flush(std::time::Duration::from_secs(2));
    let own = nix::fcntl::open(
        "/proc/self/exe",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    );
    let err = match own {
        Ok(own) => exec(&own, &state),
        Err(e) => io::Error::from(e),
    };
    drop((fds, control));
    err
}
