//! Starting one worker process: its channel on fd 3, its environment, its
//! output piped to lb, its own process group, death with the master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::launch::{self, Fd3};
use crate::config::{ChannelKind, Mode, Pool};
use crate::policy::Slot;
use crate::proto::{self, WORKER_FD, env};
use crate::sys;

/// What a worker is told beyond its pool's own command and environment.
pub struct Launch<'a> {
    pub slot: Slot,
    /// Its place among its pool's slots, from 0 (PM2's `NODE_APP_INSTANCE`).
    pub instance: usize,
    pub generation: u64,
    /// The policy reads close reports (native: `LB_REPORT_CLOSED=1`; node:
    /// the preload at `node_preload` is required).
    pub report_closed: bool,
    /// lb reads PROXY protocol headers: a Node worker requires the preload
    /// at `node_preload` to give its sockets the clients' addresses.
    pub proxy_protocol: bool,
    /// Node's `cluster.worker.id`: unique per process, from 1.
    pub node_id: u64,
    pub node_preload: Option<&'a Path>,
    /// lb's port (what `{port}` in the arguments becomes, and the port the
    /// shim takes over unless the pool names another).
    pub port: u16,
    /// Shim mode: the in-memory shim.
    pub shim: Option<&'a crate::shim::Memfd>,
    /// Shared mode: lb's listeners, passed as fds 3 on, each with its name
    /// for `LISTEN_FDNAMES` (the pool's when it has none); under kernel
    /// dispatch, the worker's own listener.
    pub listeners: Vec<(std::os::fd::RawFd, Option<&'a str>)>,
    /// Kernel dispatch: an lb-protocol worker is sent a listener of its
    /// own (`LB_OWN_LISTENER=1`).
    pub own_listener: bool,
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
    pub pid: u32,
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

/// The channel `mode` talks over: (the master's end, the worker's end).
fn channel(mode: Mode, queue: usize) -> io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
    match mode.channel() {
        ChannelKind::Packets => {
            let (channel, peer) = proto::pair()?;
            // The kernel doubles what is asked for, and charges each message
            // its buffer overhead: this many CONNs fit, then EAGAIN, and the
            // dispatcher skips the worker until it reads.
            let bytes = queue.saturating_mul(message_cost()) / 2;
            socket2::SockRef::from(&channel).set_send_buffer_size(bytes)?;
            Ok((Some(channel), Some(peer)))
        }
        ChannelKind::Stream => proto::stream_pair().map(|(c, p)| (Some(c), Some(p))),
        ChannelKind::None => Ok((None, None)),
    }
}

/// The worker's command: what every mode gets (its pool's environment,
/// lb's variables, pipes, a process group of its own, none of the
/// master's systemd variables), then its mode's part, then the arguments
/// with `{port}` filled in.
pub(super) fn command(pool: &Pool, launch: &Launch<'_>) -> io::Result<(Command, Fd3)> {
    let mut cmd = Command::new(&pool.command);
    cmd.envs(pool.env.iter().map(|(k, v)| (k, v)))
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
        .env_remove(crate::systemd::VARS[4])
        .env_remove(crate::systemd::VARS[5])
        .env_remove(crate::upgrade::STATE_VAR)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mode = launch::set_up(&mut cmd, pool, launch)?;
    let port_text = mode.port.to_string();
    cmd.args(pool.args.iter().map(|a| match a.to_str() {
        Some(s) if s.contains("{port}") => s.replace("{port}", &port_text).into(),
        _ => a.clone(),
    }));
    Ok((cmd, mode.fd3))
}

/// The pool's `user`, `group`, `cwd` and `umask`, as the child takes them.
fn become_of(pool: &Pool) -> io::Result<sys::Become> {
    use std::os::unix::ffi::OsStrExt;
    let r = &pool.run_as;
    let cwd = match &r.cwd {
        Some(dir) => Some(
            std::ffi::CString::new(dir.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    Ok(sys::Become {
        ids: r.ids.as_ref().map(|i| (i.uid, i.gid, i.groups.clone())),
        cwd,
        umask: r.umask,
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
    let (channel, peer) = channel(pool.mode, launch.queue)?;
    let (mut cmd, fd3) = command(pool, launch)?;
    sys::become_in_child(&mut cmd, become_of(pool)?);
    match fd3 {
        Fd3::Listeners(listeners) => {
            sys::prepare_child(&mut cmd, None, WORKER_FD);
            sys::place_fds(&mut cmd, listeners, WORKER_FD);
            sys::exec_with_own_pid(&mut cmd, "LISTEN_PID")?;
        }
        Fd3::Channel => {
            sys::prepare_child(&mut cmd, peer.as_ref().map(|p| p.as_raw_fd()), WORKER_FD)
        }
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
    // (std's handle goes here: the worker is reaped by its pidfd.)
    Ok(Spawned {
        pid: child.id(),
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
pub fn describe(status: nix::sys::wait::WaitStatus) -> String {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pool(mode: Mode) -> Pool {
        Pool {
            name: "web".into(),
            command: "/bin/true".into(),
            args: vec!["--port={port}".into(), "x{port}y".into(), "plain".into()],
            env: vec![("APP".into(), "1".into())],
            count: 1,
            weight: 1,
            mode,
            port: None,
            send_proxy: Default::default(),
            stop_signal: 3,
            run_as: Default::default(),
        }
    }

    fn launch() -> Launch<'static> {
        Launch {
            slot: Slot(2),
            instance: 1,
            generation: 4,
            report_closed: true,
            proxy_protocol: false,
            node_id: 5,
            node_preload: None,
            port: 8000,
            shim: None,
            listeners: Vec::new(),
            own_listener: false,
            proxy_port: None,
            drain_timeout: std::time::Duration::from_millis(1500),
            queue: 8,
        }
    }

    /// What `cmd` sets (`Some`) and removes (`None`), and its arguments.
    fn made(
        pool: &Pool,
        launch: &Launch<'_>,
    ) -> (BTreeMap<String, Option<String>>, Vec<String>, Fd3) {
        let (cmd, fd3) = command(pool, launch).unwrap();
        let text = |s: &std::ffi::OsStr| s.to_str().unwrap().to_string();
        let envs = cmd
            .get_envs()
            .map(|(k, v)| (text(k), v.map(text)))
            .collect();
        (envs, cmd.get_args().map(text).collect(), fd3)
    }

    fn expect(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        let common = [
            ("APP", Some("1")),
            ("LB_WORKER_ID", Some("2")),
            ("LB_GENERATION", Some("4")),
            ("LB_DRAIN_TIMEOUT_MS", Some("1500")),
            ("NOTIFY_SOCKET", None),
            ("LISTEN_FDS", None),
            ("LISTEN_PID", None),
            ("LISTEN_FDNAMES", None),
            ("WATCHDOG_USEC", None),
            ("WATCHDOG_PID", None),
            ("LB_UPGRADE_STATE", None),
        ];
        common
            .iter()
            .chain(pairs)
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    fn args(port: &str) -> Vec<String> {
        vec![
            format!("--port={port}"),
            format!("x{port}y"),
            "plain".into(),
        ]
    }

    #[test]
    fn native_and_node_workers_get_their_variables_and_fd_3() {
        let (envs, a, fd3) = made(&pool(Mode::Native), &launch());
        assert_eq!(
            envs,
            expect(&[
                ("LB_FD", Some("3")),
                ("LB_PROTOCOL", Some("1")),
                ("LB_REPORT_CLOSED", Some("1")),
                ("LB_OWN_LISTENER", Some("0")),
            ])
        );
        assert_eq!((a, fd3), (args("8000"), Fd3::Channel));
        // Kernel dispatch: a LISTENER comes first.
        let mut l = launch();
        l.own_listener = true;
        let (envs, _, fd3) = made(&pool(Mode::Native), &l);
        assert_eq!(envs["LB_OWN_LISTENER"], Some("1".into()));
        assert_eq!(fd3, Fd3::Channel);

        let mut node = pool(Mode::Node);
        node.env.push(("NODE_OPTIONS".into(), "--inspect".into()));
        let mut l = launch();
        l.node_preload = Some(Path::new("/run/lb/close-report.js"));
        let (envs, a, fd3) = made(&node, &l);
        let mut want = expect(&[
            ("LB_OWN_LISTENER", Some("0")),
            ("NODE_APP_INSTANCE", Some("1")),
            ("NODE_UNIQUE_ID", Some("5")),
            ("NODE_CHANNEL_FD", Some("3")),
            ("NODE_CHANNEL_SERIALIZATION_MODE", Some("json")),
            (
                "NODE_OPTIONS",
                Some("--inspect --require \"/run/lb/close-report.js\""),
            ),
        ]);
        assert_eq!(envs, want);
        assert_eq!((a, fd3), (args("8000"), Fd3::Channel));
        // Without the preload (no close reports), NODE_OPTIONS is theirs.
        let (envs, _, _) = made(&node, &launch());
        want.insert("NODE_OPTIONS".into(), Some("--inspect".into()));
        assert_eq!(envs, want);
    }

    /// Behind a balancer (PROXY protocol) a Node worker's preload is told
    /// to give sockets the clients' addresses, and to report closes only
    /// when the policy reads them; without it the preload is told nothing.
    #[test]
    fn node_workers_behind_a_balancer_are_told_what_the_preload_does() {
        let node = pool(Mode::Node);
        let mut l = launch();
        l.node_preload = Some(Path::new("/run/lb/close-report.js"));
        assert!(!made(&node, &l).0.contains_key("LB_NODE_PRELOAD"));
        l.proxy_protocol = true;
        let (envs, _, _) = made(&node, &l);
        assert_eq!(envs["LB_NODE_PRELOAD"].as_deref(), Some("addresses,closes"));
        l.report_closed = false;
        let (envs, _, _) = made(&node, &l);
        assert_eq!(envs["LB_NODE_PRELOAD"].as_deref(), Some("addresses"));
        assert_eq!(
            envs["NODE_OPTIONS"].as_deref(),
            Some("--require \"/run/lb/close-report.js\"")
        );
    }

    /// PM2's NODE_APP_INSTANCE: the place in the pool, for a Node app in
    /// any mode, and for nothing else.
    #[test]
    fn node_workers_get_node_app_instance_in_any_mode() {
        let mut node = pool(Mode::Proxy);
        node.command = "/usr/bin/node".into();
        let mut l = launch();
        l.proxy_port = Some(41000);
        let (envs, _, _) = made(&node, &l);
        assert_eq!(envs["NODE_APP_INSTANCE"].as_deref(), Some("1"));
        assert_eq!(envs["LB_WORKER_ID"].as_deref(), Some("2"));
        let (envs, _, _) = made(&pool(Mode::Proxy), &l);
        assert!(!envs.contains_key("NODE_APP_INSTANCE"));
    }

    #[test]
    fn proxy_and_shared_workers_get_their_port_or_the_listener() {
        let mut l = launch();
        l.proxy_port = Some(41000);
        let (envs, a, fd3) = made(&pool(Mode::Proxy), &l);
        assert_eq!(envs, expect(&[("PORT", Some("41000"))]));
        assert_eq!((a, fd3), (args("41000"), Fd3::Channel));
        assert!(command(&pool(Mode::Proxy), &launch()).is_err());

        let mut l = launch();
        l.listeners = vec![(7, None)];
        let (envs, a, fd3) = made(&pool(Mode::Shared), &l);
        let mut want = expect(&[("EINHORN_FD_COUNT", Some("1")), ("EINHORN_FD_0", Some("3"))]);
        want.insert("LISTEN_FDS".into(), Some("1".into()));
        want.insert("LISTEN_FDNAMES".into(), Some("web".into()));
        assert_eq!(envs, want);
        assert_eq!((a, fd3), (args("8000"), Fd3::Listeners(vec![7])));
        // Several: fds 3 on, named as configured (the pool's name otherwise).
        l.listeners = vec![(7, None), (9, Some("api"))];
        let (envs, _, fd3) = made(&pool(Mode::Shared), &l);
        assert_eq!(envs["LISTEN_FDS"].as_deref(), Some("2"));
        assert_eq!(envs["LISTEN_FDNAMES"].as_deref(), Some("web:api"));
        assert_eq!(envs["EINHORN_FD_COUNT"].as_deref(), Some("2"));
        assert_eq!(envs["EINHORN_FD_1"].as_deref(), Some("4"));
        assert_eq!(fd3, Fd3::Listeners(vec![7, 9]));
        assert!(command(&pool(Mode::Shared), &launch()).is_err());
    }

    #[test]
    fn shim_workers_get_the_shim_in_front_of_their_preload() {
        let memfd = crate::shim::Memfd::create().unwrap();
        let mut shim = pool(Mode::Shim);
        shim.port = Some(9000);
        shim.env.push(("LD_PRELOAD".into(), "libtheirs.so".into()));
        let mut l = launch();
        l.report_closed = false;
        l.shim = Some(&memfd);
        let (envs, a, fd3) = made(&shim, &l);
        let fd = memfd.raw().to_string();
        let preload = format!("/proc/self/fd/{fd} libtheirs.so");
        assert_eq!(
            envs,
            expect(&[
                ("LB_FD", Some("3")),
                ("LB_PROTOCOL", Some("1")),
                ("LB_REPORT_CLOSED", Some("0")),
                ("LB_OWN_LISTENER", Some("0")),
                ("LB_SHIM_PORT", Some("9000")),
                ("LB_STOP_SIGNAL", Some("3")),
                ("LB_SHIM_FD", Some(&fd)),
                ("LD_PRELOAD", Some(&preload)),
            ])
        );
        assert_eq!((a, fd3), (args("9000"), Fd3::Channel));
        // lb's own port when the pool names none.
        shim.port = None;
        assert_eq!(made(&shim, &l).1, args("8000"));
        assert!(command(&shim, &launch()).is_err());
    }
}
