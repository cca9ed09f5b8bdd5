//! lb's listening sockets, in configured order: taken from systemd (socket
//! activation; matched to the configured listeners by `LISTEN_FDNAMES`,
//! else by position) or bound from the configuration: TCP on IPv4 or IPv6
//! (`IPV6_V6ONLY` as configured) and Unix stream sockets (a stale file
//! replaced, its mode and owner set, removed again when lb stops).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Address, Listener};
use crate::dispatch::kernel::Steering;
use crate::master::MasterError;

/// One listener, listening, non-blocking and CLOEXEC.
#[derive(Debug)]
pub struct Open {
    pub fd: OwnedFd,
    /// Its settings, with the address it has (the port the kernel chose
    /// for port 0; what systemd passed).
    pub settings: Listener,
    /// A Unix socket's file that lb made, and removes when it stops.
    pub made: Option<PathBuf>,
}

impl Open {
    pub fn address(&self) -> &Address {
        &self.settings.address
    }
}

/// Removes the Unix socket files lb made, when dropped (lb stops).
#[derive(Debug, Default)]
pub struct Made(Vec<PathBuf>);

impl Made {
    pub fn of(open: &[Open]) -> Made {
        Made(open.iter().filter_map(|o| o.made.clone()).collect())
    }

    /// Leaves the files in place (`lb upgrade`: the next image serves them).
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The sockets systemd passed, each given the settings of the configured
/// listener of its name (`FileDescriptorName=` = a `[[listen]]` `name`),
/// else of the one in its position, else the first's.
pub fn activated(
    inherited: Vec<(OwnedFd, Option<String>)>,
    configured: &[Listener],
) -> Result<Vec<Open>, MasterError> {
    let mut used = vec![false; configured.len()];
    let mut open = Vec::with_capacity(inherited.len());
    for (i, (fd, name)) in inherited.into_iter().enumerate() {
        let address = address_of(&fd).map_err(MasterError::ListenerAddress)?;
        // Its name's table; else the first unnamed one not taken (in
        // order: the place); else, with every table taken, the first
        // unnamed one's settings again (systemd passed more than listed).
        let named = name
            .as_deref()
            .and_then(|n| configured.iter().position(|l| l.name.as_deref() == Some(n)));
        let unnamed = || (0..configured.len()).find(|&j| configured[j].name.is_none() && !used[j]);
        let j = match named.or_else(unnamed) {
            Some(j) => j,
            None => match configured.iter().position(|l| l.name.is_none()) {
                Some(j) => j,
                None => {
                    return Err(MasterError::Listen {
                        addr: address.to_string(),
                        reason: format!(
                            "systemd passed it (fd {fd_number}, named `{n}`), but no [[listen]] \
                             table has that name; set name = \"{n}\" on the table meant for it",
                            fd_number = 3 + i,
                            n = name.as_deref().unwrap_or("")
                        ),
                    });
                }
            },
        };
        used[j] = true;
        let mut settings = configured[j].clone();
        settings.address = address;
        settings.name = name.or(settings.name);
        open.push(Open {
            fd,
            settings,
            made: None,
        });
    }
    for (l, _) in configured.iter().zip(&used).filter(|(_, u)| !**u) {
        crate::warn!(
            "{} is in the configuration but systemd passed no socket for it: not served (add \
             it to the socket unit, or remove it)",
            l.address
        );
    }
    Ok(open)
}

/// The listeners an earlier image of this master handed over (`lb
/// upgrade`), in configured order: each keeps its settings (the check
/// made sure the configuration lists the same ones) and the file lb made.
pub fn handed_over(
    fds: Vec<(OwnedFd, Option<PathBuf>)>,
    configured: &[Listener],
) -> Result<Vec<Open>, MasterError> {
    if fds.len() != configured.len() {
        return Err(MasterError::Listen {
            addr: configured
                .iter()
                .map(|l| l.address.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!(
                "the master's last image handed over {} listeners for these {}",
                fds.len(),
                configured.len()
            ),
        });
    }
    let mut open = Vec::with_capacity(fds.len());
    for ((fd, made), l) in fds.into_iter().zip(configured) {
        let mut settings = l.clone();
        settings.address = address_of(&fd).map_err(MasterError::ListenerAddress)?;
        open.push(Open { fd, settings, made });
    }
    Ok(open)
}

/// Where a listening socket is.
fn address_of(fd: &OwnedFd) -> io::Result<Address> {
    let addr = socket2::SockRef::from(fd).local_addr()?;
    if let Some(a) = addr.as_socket() {
        return Ok(Address::Tcp(a));
    }
    Ok(Address::Unix(
        addr.as_pathname()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    ))
}

/// Binds every configured listener; `steering` (kernel dispatch, one TCP
/// listener) is attached to the first before it listens.
pub fn bind_all(
    configured: &[Listener],
    steering: Option<&Steering>,
) -> Result<Vec<Open>, MasterError> {
    let mut open = Vec::with_capacity(configured.len());
    for (i, l) in configured.iter().enumerate() {
        let steering = if i == 0 { steering } else { None };
        let bound = match &l.address {
            Address::Tcp(addr) => bind_tcp(*addr, l, steering).map(|fd| (fd, None)),
            Address::Unix(path) => bind_unix(path, l).map(|fd| (fd, Some(path.clone()))),
        }
        .and_then(|(fd, made)| match address_of(&fd) {
            Ok(address) => Ok((fd, made, address)),
            Err(e) => {
                drop(Made(made.into_iter().collect()));
                Err(MasterError::ListenerAddress(e))
            }
        });
        let (fd, made_path, address) = match bound {
            Ok(b) => b,
            Err(e) => {
                // The files of those bound so far go with them.
                drop(Made::of(&open));
                return Err(e);
            }
        };
        let mut settings = l.clone();
        settings.address = address;
        open.push(Open {
            fd,
            settings,
            made: made_path,
        });
    }
    Ok(open)
}

fn refusal(address: &Address, e: &io::Error) -> MasterError {
    let reason = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            "address already in use; stop the other process or choose another --listen".into()
        }
        Some(libc::EACCES) => match address {
            Address::Tcp(_) => {
                "permission denied; ports below 1024 need privileges, choose another --listen"
                    .into()
            }
            Address::Unix(_) => {
                "permission denied; lb cannot make a file in that directory, choose another \
                 path"
                    .into()
            }
        },
        Some(libc::EADDRNOTAVAIL) => {
            "address not available on this machine; choose another --listen".into()
        }
        Some(libc::ENOENT) => "its directory does not exist; make it or choose another path".into(),
        _ => e.to_string(),
    };
    MasterError::Listen {
        addr: address.to_string(),
        reason,
    }
}

/// Binds `addr` the way a server should: CLOEXEC and non-blocking from
/// birth, `SO_REUSEADDR` so a restart does not wait out TIME_WAIT. With
/// `steering` (kernel dispatch) it is the anchor of a reuseport group the
/// workers' own listeners join, and the program is attached before it
/// listens, so that no connection ever queues on it; the port is first
/// bound without `SO_REUSEPORT`, so a port someone else holds is still "in
/// use" rather than shared.
pub fn bind_tcp(
    addr: SocketAddr,
    l: &Listener,
    steering: Option<&Steering>,
) -> Result<OwnedFd, MasterError> {
    let fail = |e: io::Error| refusal(&Address::Tcp(addr), &e);
    let socket = tcp_socket(addr, l.v6only).map_err(fail)?;
    if steering.is_some() {
        // Free ports only: a probe without SO_REUSEPORT fails on a port that
        // another group (another lb) holds, and frees it at once.
        let probe = tcp_socket(addr, l.v6only).map_err(fail)?;
        probe.bind(&addr.into()).map_err(fail)?;
        let bound = probe.local_addr().ok().and_then(|a| a.as_socket());
        drop(probe);
        socket.set_reuse_port(true).map_err(fail)?;
        // Port 0: the kernel's choice, which the probe learned.
        socket.bind(&bound.unwrap_or(addr).into()).map_err(fail)?;
    } else {
        socket.bind(&addr.into()).map_err(fail)?;
    }
    if let Some(steering) = steering {
        steering.attach(socket.as_fd()).map_err(|e| {
            MasterError::KernelDispatch(format!(
                "cannot attach the BPF program to the listener ({e})"
            ))
        })?;
    }
    socket.listen(backlog(l)).map_err(fail)?;
    Ok(socket.into())
}

fn tcp_socket(addr: SocketAddr, v6only: Option<bool>) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if let Some(only) = v6only {
        socket.set_only_v6(only)?;
    }
    Ok(socket)
}

fn backlog(l: &Listener) -> i32 {
    l.backlog.min(i32::MAX as u32) as i32
}

/// Binds a Unix stream socket at `path`. A socket file nobody listens on
/// (left by a process that died) is replaced; a live one, or a file that
/// is not a socket, is refused.
fn bind_unix(path: &Path, l: &Listener) -> Result<OwnedFd, MasterError> {
    let address = Address::Unix(path.to_path_buf());
    let fail = |e: io::Error| refusal(&address, &e);
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only a refused connect says nobody listens; it is tried
            // without blocking (a live server's full backlog would
            // otherwise hold lb's start), and a socket lb may not even
            // open is someone else's.
            let probe = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)
                .map_err(fail)?;
            let live = |reason: &str| MasterError::Listen {
                addr: address.to_string(),
                reason: reason.into(),
            };
            match probe.connect(&SockAddr::unix(path).map_err(fail)?) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).map_err(fail)?
                }
                Ok(()) => {
                    return Err(live(
                        "another process listens on this socket; stop it or choose another path",
                    ));
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINPROGRESS)) => {
                    return Err(live(
                        "another process listens on this socket; stop it or choose another path",
                    ));
                }
                Err(e) => {
                    return Err(live(&format!(
                        "a socket file lb cannot tell is stale is in the way ({e}); remove it or \
                         choose another path"
                    )));
                }
            }
        }
        Ok(_) => {
            return Err(MasterError::Listen {
                addr: address.to_string(),
                reason: "a file that is not a socket is in the way; remove it or choose another \
                         path"
                    .into(),
            });
        }
        Err(_) => {}
    }
    let socket =
        Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).map_err(fail)?;
    socket
        .bind(&SockAddr::unix(path).map_err(fail)?)
        .map_err(fail)?;
    // By path, but only while the path is still the socket just made (a
    // symlink swapped in would send a chmod elsewhere; lchown never
    // follows one).
    let set_up = || -> io::Result<()> {
        let p = &l.permissions;
        if p.owner.is_some() || p.group.is_some() {
            std::os::unix::fs::lchown(
                path,
                p.owner.map(|u| u.as_raw()),
                p.group.map(|g| g.as_raw()),
            )?;
        }
        if let Some(mode) = p.mode {
            if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                return Err(io::Error::other("the socket file was replaced"));
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        socket.listen(backlog(l))
    };
    if let Err(e) = set_up() {
        let _ = std::fs::remove_file(path);
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(MasterError::Listen {
                addr: address.to_string(),
                reason: "lb may not give the socket file that owner or group (it takes root, \
                         or a group lb's user is in); change owner/group or run lb as root"
                    .into(),
            });
        }
        return Err(fail(e));
    }
    Ok(socket.into())
}
