//! Wires a master together: binds the listener, starts the dispatch thread,
//! runs the supervisor on this thread, and stops both in order.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::config::{Config, ConfigError, Dispatch};
use crate::control;
use crate::dispatch::{self, Dispatcher, Notifier};
use crate::listeners;
use crate::supervisor::{self, Reconfigure, Supervisor, SupervisorError};
use crate::sys;
use crate::upgrade;
use crate::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// What the configuration names cannot be used (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot block signals: {0}")]
    BlockSignals(#[source] nix::Error),
    #[error("inherited fds: {0}")]
    InheritedFds(#[source] io::Error),
    #[error("socket activation: {0}")]
    SocketActivation(#[source] io::Error),
    #[error("listener address: {0}")]
    ListenerAddress(#[source] io::Error),
    #[error("dispatcher: {0}")]
    Dispatcher(#[source] io::Error),
    #[error(
        "cannot make {max_conns} relays for proxy mode: {source}; lower --max-conns or raise \
         the open-files limit (ulimit -n)"
    )]
    Relays { max_conns: usize, source: io::Error },
    #[error("cannot open the log file: {0}")]
    LogFile(#[source] io::Error),
    #[error("dispatch thread: {0}")]
    DispatchThread(#[source] io::Error),
    /// `--dispatch kernel` cannot work here.
    #[error("--dispatch kernel: {0}")]
    KernelDispatch(String),
    #[error(transparent)]
    Watch(#[from] supervisor::watch::WatchError),
    #[error("upgrade: cannot re-execute the master ({0}); its workers are lost with it")]
    Upgrade(#[source] io::Error),
}

/// How a master ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker drained in time.
    Drained,
    /// Some worker had to be killed (drain timeout, second signal, SIGQUIT).
    Forced,
}

/// Runs a master until it is told to stop. `reconfigure` loads the
/// configuration again for a reload (SIGHUP, `lb reload`).
pub fn run(
    config: Config,
    reconfigure: Reconfigure,
    mut inherited: Option<upgrade::State>,
) -> Result<Outcome, MasterError> {
    // Blocked before any thread starts, so every thread inherits the mask
    // and the supervisor's signalfd is the only reader.
    supervisor::handled_signals()
        .thread_block()
        .map_err(MasterError::BlockSignals)?;
    let open_files = sys::raise_nofile_limit().ok();
    // Socket activation's fds are taken below (and kept CLOEXEC there).
    sys::cloexec_from(3).map_err(MasterError::InheritedFds)?;

    // Kernel dispatch's program, made before the listener it steers from
    // (never after an upgrade: a master under it is not upgraded).
    let mut steering = match inherited {
        Some(_) => None,
        None => kernel_program(&config)?,
    };
    let activated = match inherited {
        Some(_) => Vec::new(),
        None => crate::systemd::activated_listeners().map_err(MasterError::SocketActivation)?,
    };
    let names: Vec<Option<String>> = activated.iter().map(|(_, n)| n.clone()).collect();
    let was_activated = !activated.is_empty();
    let open = if let Some(state) = &inherited {
        upgrade::adopt::listeners(state, &config.listeners)?
    } else if activated.is_empty() {
        listeners::bind_all(&config.listeners, steering.as_ref())?
    } else {
        let open = listeners::activated(activated, &config.listeners)?;
        for l in &open {
            // A master killed while stopping may have left its stop filter
            // on a socket systemd keeps (dispatch: SYN_DROP).
            let _ = socket2::SockRef::from(&l.fd).detach_filter();
        }
        if steering.is_some() {
            steering = attach_to_activated(&config, steering, &open)?;
        }
        open
    };
    let made = listeners::Made::of(&open);
    // For an upgrade's next image: what each listener is besides its fd.
    let carried: Vec<upgrade::state::Listener> = open
        .iter()
        .enumerate()
        .map(|(i, l)| upgrade::state::Listener {
            fd: -1,
            made: l.made.clone(),
            name: match &inherited {
                Some(s) => s.listeners.get(i).and_then(|l| l.name.clone()),
                None => names.get(i).cloned().flatten(),
            },
        })
        .collect();
    let activated = inherited.as_ref().map_or(was_activated, |s| s.activated);
    for l in &open {
        // Every client must send a PROXY header first: accept hands out a
        // connection once its first bytes are there, so the header stage
        // rarely has to wait for one in the poll.
        let rules = &l.settings.proxy;
        if rules.protocol.is_on()
            && rules.untrusted == crate::config::Untrusted::Refuse
            && l.address().tcp().is_some()
        {
            let secs = config
                .proxy_header_timeout
                .as_secs()
                .clamp(1, u64::from(u32::MAX)) as u32;
            let _ = sys::defer_accept(l.fd.as_fd(), secs);
        }
    }
    // (Reloads may bring Node pools too; the stop line then counts from 0.)
    let any_node = config.any_node();
    let local = open
        .iter()
        .find_map(|l| l.address().tcp())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let listening: Vec<String> = open.iter().map(|l| l.address().to_string()).collect();

    // Everything the configuration names is checked, and the control and
    // metrics servers started, before the line that says lb is up.
    let control_path = match config.control.clone() {
        Some(path) => path,
        None => control::path::server_default(local.port()).map_err(control::ControlError::Dir)?,
    };
    crate::config::preflight(&config, &control_path, open_files)?;
    crate::log::init(
        config.log_format,
        config.log_timestamps,
        config.log_file.as_deref(),
    )
    .map_err(MasterError::LogFile)?;
    let event_loop = supervisor::EventLoop::new()?;
    let waker = event_loop.waker();
    let (control_tx, control_rx) = crossbeam_channel::unbounded();
    let control = match inherited.as_mut().and_then(|s| s.control.take()) {
        Some(fd) => control::Server::adopt(
            &control_path,
            sys::handed_over(fd).map_err(MasterError::InheritedFds)?,
            control_tx.clone(),
            Arc::clone(&waker),
        )?,
        None => control::Server::start(&control_path, control_tx.clone(), Arc::clone(&waker))?,
    };
    let (metrics, metrics_copy) = match config.metrics {
        Some(addr) => {
            let listen_err = |e: io::Error| MasterError::Listen {
                addr: addr.to_string(),
                reason: format!("{e} (for --metrics)"),
            };
            let listener = match inherited.as_mut().and_then(|s| s.metrics.take()) {
                Some(fd) => std::net::TcpListener::from(
                    sys::handed_over(fd).map_err(MasterError::InheritedFds)?,
                ),
                None => std::net::TcpListener::bind(addr).map_err(listen_err)?,
            };
            let copy = listener.try_clone().map_err(listen_err)?;
            let bound =
                control::metrics::serve_on(listener, control_tx.clone(), Arc::clone(&waker))
                    .map_err(listen_err)?;
            (Some(bound), Some(std::os::fd::OwnedFd::from(copy)))
        }
        None => (None, None),
    };
    // lb's own files change as it runs: never a reason to reload. A worker
    // log pattern names many files: the directory they are made in.
    let pattern = |p: &std::path::PathBuf| p.to_string_lossy().contains('{');
    let own = [
        Some(control_path.clone()),
        config.log_file.clone(),
        config.worker_log.clone().filter(|p| !pattern(p)),
    ];
    let own_dirs = config
        .worker_log
        .iter()
        .filter(|p| pattern(p))
        .filter_map(|p| {
            let text = p.to_string_lossy();
            let fixed = &text[..text.find('{').unwrap_or(text.len())];
            std::path::Path::new(fixed)
                .parent()
                .map(|d| d.to_path_buf())
        })
        .collect();
    let _watch = supervisor::watch::start(
        &config.watch,
        own.into_iter().flatten().collect(),
        own_dirs,
        control_tx.clone(),
        Arc::clone(&waker),
    )?;
    info!(
        "listening on {} (policy {}, {} workers: {})",
        listening.join(", "),
        config.policy,
        config.slots(),
        config
            .pools
            .iter()
            .map(|p| format!(
                "{}×{} weight {} mode {} `{}`",
                p.name,
                p.count,
                p.weight,
                p.mode,
                p.command.display()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    info!("control socket {}", control.path().display());
    if let Some(bound) = metrics {
        info!("metrics on http://{bound}/metrics");
    }
    let (notifier, events_rx) = Notifier::new(Some(waker));
    // Shared mode: the workers accept from the listener; lb only holds it
    // (so its backlog outlives restarts) and never accepts itself.
    let shared = config.shared();
    let mut kernel = false;
    let (mut dispatcher, handle, shared_listeners) = if shared {
        if steering.is_none() && config.policy_explicit {
            info!(
                "policy {} has no effect in shared mode: the kernel balances accept() calls",
                config.policy
            );
        }
        let d = Dispatcher::without_listener(local, config.policy, config.slots(), notifier)
            .map_err(MasterError::Dispatcher)?;
        // The workers' own accept() calls are blocking or not as each
        // server likes: the flag belongs to the socket they all share, and
        // a textbook blocking server would get EAGAIN from lb's choice.
        // (After an upgrade the running workers have set it as they like:
        // clearing it would leave a server that polls before it accepts
        // blocked in accept, deaf to its stop signal — gunicorn, seen.)
        let mut shared = Vec::with_capacity(open.len());
        for l in open {
            if inherited.is_none() {
                socket2::SockRef::from(&l.fd)
                    .set_nonblocking(false)
                    .map_err(MasterError::ListenerAddress)?;
            }
            shared.push((l.fd, l.settings.name));
        }
        (d.0, d.1, shared)
    } else {
        // Under kernel dispatch lb's listener is the group's anchor, and
        // takes no connection (the program never picks it).
        let rules: Vec<_> = open
            .iter()
            .map(|l| (l.address().to_string(), l.settings.proxy.clone()))
            .collect();
        let addresses = open.iter().map(|l| l.address().clone()).collect();
        let (mut d, h) = Dispatcher::with_listeners(
            open.into_iter().map(|l| (l.fd, l.made)).collect(),
            local,
            config.policy,
            config.slots(),
            notifier,
        )
        .map_err(MasterError::Dispatcher)?;
        d.node_listeners(addresses);
        if let Some(timeout) = config.stall_timeout {
            d.watch_stalls(timeout, supervisor::message_cost());
        }
        if config.relays() {
            d.enable_proxy(config.max_conns, config.drain_timeout / 2)
                .map_err(|source| MasterError::Relays {
                    max_conns: config.max_conns,
                    source,
                })?;
            d.set_proxy_timeouts(config.proxy_connect_timeout, config.proxy_idle_timeout);
        }
        for (i, (address, rules)) in rules.into_iter().enumerate() {
            if !rules.protocol.is_on() {
                continue;
            }
            let unix = address.starts_with("unix:");
            info!(
                "proxy_protocol {} on {address}: each connection from {} starts with a PROXY \
                 header, which lb reads and hands on as the client's address{}",
                rules.protocol,
                if unix {
                    "anyone who may open the socket".to_string()
                } else if rules.trusted.is_empty() {
                    "nowhere".to_string()
                } else {
                    rules
                        .trusted
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                match (unix, rules.untrusted) {
                    (true, _) => "",
                    (false, crate::config::Untrusted::Refuse) => "; others are refused",
                    (false, crate::config::Untrusted::Serve) => {
                        "; others are served as direct clients"
                    }
                }
            );
            d.read_proxy_headers_on(
                i,
                dispatch::header::Rules {
                    accept: rules.protocol,
                    trusted: rules.trusted,
                    untrusted: rules.untrusted,
                    timeout: config.proxy_header_timeout,
                },
            );
        }
        (d, h, Vec::new())
    };
    if let Some(steering) = steering {
        info!(
            "dispatch kernel: a BPF program picks each connection's worker ({}); lb is off the \
             accept path",
            config.policy
        );
        dispatcher.steer_in_kernel(steering);
        kernel = true;
        // Shared-mode workers too: their own listeners' queues are watched.
        if let Some(timeout) = config.stall_timeout {
            dispatcher.watch_stalls(timeout, supervisor::message_cost());
        }
    }
    if let Some(s) = &inherited {
        dispatcher.carry_on(s.stats, &s.by_listener, s.seq);
        info!(
            "upgraded: this is lb {} (upgrade {}), taking over {} workers",
            env!("CARGO_PKG_VERSION"),
            s.upgrades,
            s.workers.len()
        );
    }
    let thread = std::thread::Builder::new()
        .name("lb-dispatch".into())
        .spawn(move || dispatcher.run())
        .map_err(MasterError::DispatchThread)?;

    let result = Supervisor::new(
        event_loop,
        config,
        reconfigure,
        supervisor::Front {
            addr: local,
            listening,
            shared: shared_listeners,
            kernel,
            control: control_path.clone(),
        },
        handle.clone(),
        events_rx,
        control_rx,
    )
    .and_then(|s| s.taking_over(inherited).run());
    if let Ok(supervisor::Ended::Upgrade(carry)) = result {
        let _ = thread.join();
        let keep = upgrade::exec::Kept {
            listeners: carried,
            activated,
            control,
            metrics: metrics_copy,
            made,
        };
        // Returns only if neither the new binary nor this one could be
        // exec'd: the workers and listeners are lost with this process.
        return Err(MasterError::Upgrade(upgrade::exec::carry_out(*carry, keep)));
    }
    drop(control);
    drop(made);
    handle.send(dispatch::Command::Stop);
    let stats = thread.join();
    let drained = matches!(result?, supervisor::Ended::Stopped(true));
    // (In shared mode the workers accepted: lb has no counts to give.)
    if let Ok(Ok(stats)) = stats
        && !shared
    {
        info!(
            "stopped: {} connections accepted, {} dispatched, {} rescued; \
             paused {} times for want of a free worker{}",
            stats.accepted,
            stats.dispatched,
            stats.rescued,
            stats.paused,
            if any_node {
                format!("; {} refused by Node workers", stats.refused)
            } else {
                String::new()
            }
        );
    }
    Ok(if drained {
        Outcome::Drained
    } else {
        Outcome::Forced
    })
}

/// `--dispatch auto` falls back to the master in one line where `kernel`
/// fails with it.
fn refuse_kernel(
    config: &Config,
    why: String,
) -> Result<Option<dispatch::kernel::Steering>, MasterError> {
    match config.dispatch {
        Dispatch::Kernel => Err(MasterError::KernelDispatch(why)),
        _ => {
            info!("dispatch auto: the master picks ({why})");
            Ok(None)
        }
    }
}

/// Kernel dispatch's program and maps, if it is asked for and possible.
fn kernel_program(config: &Config) -> Result<Option<dispatch::kernel::Steering>, MasterError> {
    if config.dispatch == Dispatch::Master {
        return Ok(None);
    }
    if let Some(why) = Dispatch::kernel_refusal(config) {
        return refuse_kernel(config, why);
    }
    match dispatch::kernel::Steering::new(config.policy) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && sys::seccomp_filtered() => {
            refuse_kernel(
                config,
                format!(
                    "loading the BPF program was refused ({e}) by a seccomp filter; under systemd, \
                 add bpf to SystemCallFilter= (docs/kernel-dispatch.md)"
                ),
            )
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => refuse_kernel(
            config,
            format!(
                "loading the BPF program was refused ({e}); run lb as root, or give it \
                 CAP_BPF and CAP_NET_ADMIN"
            ),
        ),
        Err(e) => refuse_kernel(
            config,
            format!(
                "this kernel cannot run lb's SK_REUSEPORT program ({e}); Linux 5.14 or later \
                 is needed"
            ),
        ),
    }
}

/// A listener systemd passed is listening already: the program is
/// attached to its group now, and what queued on it before (the anchor
/// takes nothing after) is closed, said in one line: no worker accepts
/// from the anchor, and those clients would wait for nothing.
fn attach_to_activated(
    config: &Config,
    steering: Option<dispatch::kernel::Steering>,
    open: &[listeners::Open],
) -> Result<Option<dispatch::kernel::Steering>, MasterError> {
    let Some(steering) = steering else {
        return Ok(None);
    };
    let anchor = match open {
        [one] if one.address().tcp().is_some() => &one.fd,
        _ => {
            return refuse_kernel(
                config,
                format!(
                    "systemd passed {} listeners, and kernel dispatch steers one TCP listener's \
                     connections",
                    open.len()
                ),
            );
        }
    };
    // A socket systemd passed joins a group only if it was made for one.
    if !socket2::SockRef::from(anchor).reuse_port().unwrap_or(false) {
        return refuse_kernel(
            config,
            "the listener systemd passed has no SO_REUSEPORT; add ReusePort=yes to the .socket \
             unit"
                .into(),
        );
    }
    if let Err(e) = steering.attach(anchor.as_fd()) {
        return refuse_kernel(
            config,
            format!("cannot attach the BPF program to the listener ({e})"),
        );
    }
    let _ = socket2::SockRef::from(anchor).set_nonblocking(true);
    let mut closed = 0;
    while let Ok(conn) = sys::accept4(anchor.as_fd()) {
        drop(conn);
        closed += 1;
    }
    if closed > 0 {
        warn!(
            "dispatch kernel: {closed} connections that queued on the listener systemd passed \
             before lb attached its program were closed (their clients may retry)"
        );
    }
    Ok(Some(steering))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_failed_and_why() {
        let e = || io::Error::from_raw_os_error(libc::EMFILE);
        let why = e().to_string();
        assert_eq!(
            MasterError::BlockSignals(nix::Error::EINVAL).to_string(),
            format!("cannot block signals: {}", nix::Error::EINVAL)
        );
        assert_eq!(
            MasterError::InheritedFds(e()).to_string(),
            format!("inherited fds: {why}")
        );
        assert_eq!(
            MasterError::SocketActivation(e()).to_string(),
            format!("socket activation: {why}")
        );
        assert_eq!(
            MasterError::Dispatcher(e()).to_string(),
            format!("dispatcher: {why}")
        );
        let relays = MasterError::Relays {
            max_conns: 4096,
            source: e(),
        };
        assert_eq!(
            relays.to_string(),
            format!(
                "cannot make 4096 relays for proxy mode: {why}; lower --max-conns or raise the \
                 open-files limit (ulimit -n)"
            )
        );
        assert!(std::error::Error::source(&relays).is_some());
    }
}
