//! Starting one worker process: its channel on fd 3, its environment, its
//! output piped to lb, its own process group, death with the master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// The close-report preload for Node workers, written once into a
/// directory only the master can write to, and removed with it at exit.
///
/// The directory is `lb-<pid>-node-<16 random hex digits>` (see
/// `private_dir`) in `$XDG_RUNTIME_DIR` if that is a directory, else in the
/// temp directory: another local user can neither guess its name nor make
/// lb use, follow or remove anything of theirs.
pub struct Preload {
    dir: PathBuf,
    pub file: PathBuf,
}

/// The preload's name in its directory.
const PRELOAD_FILE: &str = "close-report.js";
/// Random names tried before giving up (each is taken only by chance, or
/// by someone who can read the master's memory).
const NAME_TRIES: usize = 8;

impl Preload {
    pub fn write() -> io::Result<Preload> {
        use std::os::unix::fs::OpenOptionsExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let prefix = format!("lb-{}-node-", std::process::id());
        let dir = private_dir(&base, &prefix, random_name)?;
        // From here on, dropping it removes the directory.
        let preload = Preload {
            file: dir.join(PRELOAD_FILE),
            dir,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&preload.file)?;
        io::Write::write_all(&mut file, node::PRELOAD.as_bytes())?;
        Ok(preload)
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        // Only what was made: the file, then the (then empty) directory.
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// 16 hex digits nobody else can predict: SipHash under the keys std seeds
/// from the system's secure random source (getrandom(2)), fresh for each
/// `RandomState`.
fn random_name() -> String {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    format!("{:016x}", state.hash_one(std::time::SystemTime::now()))
}

/// Makes a new directory `<base>/<prefix><next_name()>` of this uid, mode
/// 0700, the way mkdtemp(3) does: mkdir(2) fails on anything already at
/// the name (a symlink included, which it never follows), so nothing that
/// was there is used, followed or removed; a taken name is retried with
/// the next, a few times. The base must be one nobody else can rename
/// entries in (not writable by group or others unless sticky, like /tmp,
/// and of this uid or root's), and what was made is checked to be a real
/// directory of this uid.
fn private_dir(
    base: &Path,
    prefix: &str,
    mut next_name: impl FnMut() -> String,
) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    const FIX: &str = "point $XDG_RUNTIME_DIR (or, if unset, $TMPDIR) at a directory of yours";
    let uid = nix::unistd::geteuid().as_raw();
    let b = base.display();
    let meta =
        std::fs::metadata(base).map_err(|e| io::Error::new(e.kind(), format!("{b}: {e}")))?;
    let mode = meta.mode();
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{b} is not a directory")));
    }
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(io::Error::other(format!(
            "{b} belongs to uid {}, who could swap what lb puts there; {FIX}",
            meta.uid()
        )));
    }
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(io::Error::other(format!(
            "{b} is writable by others and not sticky (mode {:o}), so anyone could swap what lb \
             puts there; {FIX}",
            mode & 0o7777
        )));
    }
    for _ in 0..NAME_TRIES {
        let dir = base.join(format!("{prefix}{}", next_name()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot make a directory in {b}: {e}"),
                ));
            }
        }
        // Made by this call; still what it made (no one may rename in
        // `base`, but say so rather than trust it)?
        let made = std::fs::symlink_metadata(&dir)?;
        if !made.is_dir() || made.uid() != uid {
            return Err(io::Error::other(format!(
                "{} was replaced right after lb made it; someone can rename entries in {b}",
                dir.display()
            )));
        }
        // 0700 whatever the umask took off.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        return Ok(dir);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{NAME_TRIES} random names in {b} were all taken"),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-spawn-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn a_private_dir_is_new_0700_ours_and_unpredictable() {
        let base = scratch("private");
        let a = private_dir(&base, "lb-1-node-", random_name).unwrap();
        let b = private_dir(&base, "lb-1-node-", random_name).unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            assert_eq!(d.parent(), Some(base.as_path()));
            let name = d.file_name().unwrap().to_str().unwrap();
            let suffix = name.strip_prefix("lb-1-node-").unwrap();
            assert_eq!(suffix.len(), 16, "{name}");
            assert!(suffix.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            let meta = std::fs::symlink_metadata(d).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
            assert_eq!(meta.mode() & 0o7777, 0o700);
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_taken_name_is_skipped_and_left_as_it_was() {
        let base = scratch("taken");
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("marker"), "keep").unwrap();
        std::os::unix::fs::symlink(&victim, base.join("p-link")).unwrap();
        std::os::unix::fs::symlink(base.join("nowhere"), base.join("p-dangling")).unwrap();
        std::fs::create_dir(base.join("p-dir")).unwrap();
        std::fs::write(base.join("p-dir/marker"), "keep").unwrap();
        std::fs::write(base.join("p-file"), "keep").unwrap();
        let mut names = ["link", "dangling", "dir", "file", "free"].into_iter();
        let made = private_dir(&base, "p-", || names.next().unwrap().into()).unwrap();
        assert_eq!(made, base.join("p-free"));
        assert!(
            std::fs::symlink_metadata(base.join("p-link"))
                .unwrap()
                .is_symlink()
        );
        assert!(
            std::fs::symlink_metadata(base.join("p-dangling"))
                .unwrap()
                .is_symlink()
        );
        assert!(
            !base.join("nowhere").exists(),
            "a dangling symlink is not followed"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("marker")).unwrap(),
            "keep"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("p-dir/marker")).unwrap(),
            "keep"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("p-file")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1);
        // Only so many tries.
        let mut tries = 0;
        let e = private_dir(&base, "p-", || {
            tries += 1;
            "link".into()
        })
        .unwrap_err();
        assert_eq!(tries, NAME_TRIES);
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("were all taken"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_base_others_could_rename_in_is_refused() {
        let base = scratch("open");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&base, "p-", random_name)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by others and not sticky (mode 777)"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // Sticky, as /tmp is: only an entry's owner may rename it.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&base, "p-", random_name).unwrap();
        let e = private_dir(&base.join("missing"), "p-", random_name).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_preload_is_written_privately_and_removed_with_its_directory() {
        let preload = Preload::write().unwrap();
        let dir = preload.file.parent().unwrap().to_path_buf();
        assert_eq!(
            std::fs::read_to_string(&preload.file).unwrap(),
            node::PRELOAD
        );
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!("lb-{}-node-", std::process::id())),
            "{name}"
        );
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(
            std::fs::metadata(&preload.file).unwrap().mode() & 0o777,
            0o600
        );
        drop(preload);
        assert!(!dir.exists());
    }
}
