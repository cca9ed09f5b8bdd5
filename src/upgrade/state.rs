//! What one image of the master hands the next: JSON in an in-memory file
//! (`memfd`), which the next image finds by the fd number in
//! `LB_UPGRADE_STATE`; every fd it names is inherited at that number.
//!
//! `VERSION` changes only when a field's meaning changes: fields are added
//! with defaults, so an image reads an older image's state, and the check
//! (`check`) refuses an image that cannot read this one's.

use std::io::{self, Read, Seek, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dispatch::Stats;

/// The state format this image writes.
pub const VERSION: u32 = 1;
/// The oldest it reads.
pub const OLDEST: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The binary `lb upgrade` runs: the path lb was first started as.
    pub exe: PathBuf,
    /// In-place upgrades since lb started (this one counted).
    pub upgrades: u64,
    /// How long the master has run, ms (its status's uptime goes on).
    pub uptime_ms: u64,
    pub listeners: Vec<Listener>,
    /// The listeners came from systemd (matched to `[[listen]]` tables by
    /// name, as at start).
    pub activated: bool,
    pub control: Option<RawFd>,
    pub metrics: Option<RawFd>,
    pub reaper: Option<Reaper>,
    pub workers: Vec<Worker>,
    /// By slot: the pool it runs (`None`: free).
    pub layout: Vec<Option<String>>,
    /// Each pool's configured count at the last (re)load.
    pub configured: Vec<(String, usize)>,
    pub slots: Vec<Slot>,
    pub generation: u64,
    pub node_ids: u64,
    #[serde(default)]
    pub stats: Stats,
    #[serde(default)]
    pub by_listener: Vec<u64>,
    /// The last connection id the dispatcher sent.
    #[serde(default)]
    pub seq: u64,
    /// systemd was told READY=1.
    #[serde(default)]
    pub notified_ready: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listener {
    pub fd: RawFd,
    /// A Unix socket file lb made (removed when it stops).
    pub made: Option<PathBuf>,
    /// Its `LISTEN_FDNAMES` name, when systemd passed it.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reaper {
    pub pid: u32,
    pub pidfd: RawFd,
    pub pipe: RawFd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    pub slot: usize,
    pub pool: String,
    pub pid: u32,
    pub generation: u64,
    pub pidfd: RawFd,
    pub uptime_ms: u64,
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    pub weight: u32,
    pub channel: Option<RawFd>,
    pub peer: Option<RawFd>,
    pub peer_address: bool,
    pub batch: bool,
    pub sent: u64,
    pub closed: u64,
    pub reported: bool,
    pub messages: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Slot {
    pub restarts: u64,
    /// Its instance number and the pool it was given for.
    pub instance: Option<(String, usize)>,
}

impl State {
    /// Every fd the state names, for the exec to keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        fds.extend(self.control);
        fds.extend(self.metrics);
        if let Some(r) = &self.reaper {
            fds.extend([r.pidfd, r.pipe]);
        }
        for w in &self.workers {
            fds.push(w.pidfd);
            fds.extend(
                [w.stdout, w.stderr, w.channel, w.peer]
                    .into_iter()
                    .flatten(),
            );
        }
        fds
    }

    /// Written to a new in-memory file (close-on-exec: the caller decides).
    pub fn write(&self) -> io::Result<OwnedFd> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(c"lb-upgrade-state", MFdFlags::MFD_CLOEXEC)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
        file.rewind()?;
        Ok(OwnedFd::from(file))
    }

    /// Read from the in-memory file an earlier image wrote (closed after).
    pub fn read(fd: OwnedFd) -> io::Result<State> {
        let mut file = std::fs::File::from(fd);
        file.rewind()?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let state: State = serde_json::from_slice(&text).map_err(io::Error::other)?;
        if !(OLDEST..=VERSION).contains(&state.version) {
            return Err(io::Error::other(format!(
                "state version {} (this lb reads {OLDEST} to {VERSION})",
                state.version
            )));
        }
        // Each fd is taken once: a number named twice would be owned twice.
        let mut fds = state.fds();
        let named = fds.len();
        fds.sort_unstable();
        fds.dedup();
        if fds.len() != named || fds.first().is_some_and(|&fd| fd < 3) {
            return Err(io::Error::other(
                "the state names an fd twice, or a standard one",
            ));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: VERSION,
            exe: "/usr/bin/lb".into(),
            upgrades: 2,
            uptime_ms: 1234,
            listeners: vec![Listener {
                fd: 5,
                made: Some("/run/lb.sock".into()),
                name: None,
            }],
            activated: false,
            control: Some(6),
            metrics: None,
            reaper: None,
            workers: vec![],
            layout: vec![Some("web".into()), None],
            configured: vec![("web".into(), 1)],
            slots: vec![Slot::default(), Slot::default()],
            generation: 3,
            node_ids: 4,
            stats: Stats::default(),
            by_listener: vec![7],
            seq: 9,
            notified_ready: true,
        }
    }

    #[test]
    fn a_state_survives_its_file() {
        let s = sample();
        let back = State::read(s.write().unwrap()).unwrap();
        assert_eq!(back.upgrades, 2);
        assert_eq!(back.layout, s.layout);
        assert_eq!(back.fds(), vec![5, 6]);
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let mut s = sample();
        s.version = VERSION + 1;
        let e = State::read(s.write().unwrap()).unwrap_err().to_string();
        assert!(e.contains(&format!("state version {}", VERSION + 1)), "{e}");
    }
}
