//! Where a master keeps its control socket when not told (`--control`,
//! `LB_CONTROL`, `control`), where `lb status` and the other subcommands
//! look for it, and the checks that keep another local user from putting a
//! socket of theirs there first.
//!
//! A master listening on port P uses `<dir>/lb-P.sock`, `<dir>` being
//!
//! * under systemd with `RuntimeDirectory=` (any uid): `$RUNTIME_DIRECTORY`
//!   (its first entry), which systemd made; refused, with the reason, if it
//!   is not the uid's own or is writable by others;
//! * for root: `/run/lb`, made 0755 if missing;
//! * for any other uid: `$XDG_RUNTIME_DIR` if it is a directory of that uid
//!   that nobody else may write to, else `/tmp/lb-<uid>`, made 0700 if
//!   missing.
//!
//! A directory the master did not just make must be a real directory (not
//! a symlink) of the uid (root's for `/run/lb`) that group and others may
//! not write to; otherwise the master refuses to start and names it.
//!
//! A subcommand of uid U tries, in order, and talks to the first that
//! answers: `$RUNTIME_DIRECTORY/lb-P.sock` if set (an `ExecReload=lb
//! reload` in the unit); then for root `/run/lb/lb-P.sock`; for others
//! `$XDG_RUNTIME_DIR/lb-P.sock` (if set), `/tmp/lb-U/lb-P.sock`, then
//! `/run/lb/lb-P.sock` (a master run by root, as a service: root's only,
//! but then the subcommand can say so). Whatever it reaches, it believes
//! only a server running as root or as U (SO_PEERCRED, `client.rs`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Root's control directory.
pub const ROOT_DIR: &str = "/run/lb";

/// The socket's name in its directory.
pub fn file_name(port: u16) -> String {
    format!("lb-{port}.sock")
}

/// The directory a uid without a usable `$XDG_RUNTIME_DIR` uses.
pub fn tmp_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/lb-{uid}"))
}

/// `$XDG_RUNTIME_DIR` as a path, if set to an absolute one.
fn xdg_from(value: Option<&OsStr>) -> Option<PathBuf> {
    value.map(PathBuf::from).filter(|p| p.is_absolute())
}

fn xdg_env() -> Option<PathBuf> {
    xdg_from(std::env::var_os("XDG_RUNTIME_DIR").as_deref())
}

fn own_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The sockets a subcommand of `uid` tries, in order, for `port`.
pub fn search_order(port: u16, uid: u32, xdg: Option<&OsStr>) -> Vec<PathBuf> {
    let name = file_name(port);
    let root = Path::new(ROOT_DIR).join(&name);
    if uid == 0 {
        return vec![root];
    }
    xdg_from(xdg)
        .map(|x| x.join(&name))
        .into_iter()
        .chain([tmp_dir(uid).join(&name), root])
        .collect()
}

/// `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`, a colon-separated
/// list when it names several) as a path: its first entry, if absolute.
fn runtime_from(value: Option<&OsStr>) -> Option<PathBuf> {
    let first = value?.to_str()?.split(':').next()?;
    Some(PathBuf::from(first)).filter(|p| p.is_absolute())
}

fn runtime_env() -> Option<PathBuf> {
    runtime_from(std::env::var_os("RUNTIME_DIRECTORY").as_deref())
}

/// `search_order` after `$RUNTIME_DIRECTORY`'s socket, if that is set.
fn with_runtime(runtime: Option<PathBuf>, port: u16, order: Vec<PathBuf>) -> Vec<PathBuf> {
    let first = runtime.map(|d| d.join(file_name(port)));
    let mut all: Vec<PathBuf> = first.into_iter().chain(order).collect();
    // The same directory twice (RuntimeDirectory=lb as root) is tried once.
    let mut seen = std::collections::HashSet::new();
    all.retain(|p| seen.insert(p.clone()));
    all
}

/// `search_order` for this process.
pub fn search(port: u16) -> Vec<PathBuf> {
    with_runtime(
        runtime_env(),
        port,
        search_order(
            port,
            own_uid(),
            std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        ),
    )
}

/// `search` when no port was named (no `--listen`, no `LB_LISTEN`): after
/// the default port's sockets, the one other master's socket in those
/// directories, if there is exactly one (a service on port 80, found by a
/// plain `lb status`); with several, naming the port is the only way.
pub fn search_default(port: u16) -> Vec<PathBuf> {
    let mut order = search(port);
    let lone = lone_socket(&order);
    order.extend(lone);
    order
}

/// The `lb-<port>.sock` sockets in the directories of `order` that are not
/// in it, if there is exactly one.
fn lone_socket(order: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut dirs: Vec<&Path> = order.iter().filter_map(|p| p.parent()).collect();
    dirs.dedup();
    let mut found = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten());
    let mut others = Vec::new();
    for entry in found.by_ref() {
        let name = entry.file_name();
        let is_lb = name
            .to_str()
            .and_then(|n| n.strip_prefix("lb-")?.strip_suffix(".sock"))
            .is_some_and(|p| p.parse::<u16>().is_ok());
        let path = entry.path();
        if is_lb && entry.file_type().is_ok_and(|t| t.is_socket()) && !order.contains(&path) {
            others.push(path);
        }
    }
    others.dedup();
    (others.len() == 1).then(|| others.remove(0))
}

/// What `check_dir` needs to know of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub is_dir: bool,
    pub is_symlink: bool,
    pub uid: u32,
    pub mode: u32,
}

impl From<&std::fs::Metadata> for Entry {
    fn from(m: &std::fs::Metadata) -> Entry {
        Entry {
            is_dir: m.is_dir(),
            is_symlink: m.file_type().is_symlink(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        }
    }
}

/// Whether `entry` (at `dir`) may hold the control socket of a master of
/// `owner`: a real directory of `owner` that group and others cannot
/// write to. The error is one line naming the directory and the fix.
pub fn check_dir(dir: &Path, entry: Entry, owner: u32) -> Result<(), String> {
    let d = dir.display();
    let fix = "or pass --control PATH";
    if entry.is_symlink || !entry.is_dir {
        let what = if entry.is_symlink {
            "a symlink"
        } else {
            "not a directory"
        };
        return Err(format!(
            "the control directory {d} is {what}; remove it so that lb can make it, {fix}"
        ));
    }
    if entry.uid != owner {
        return Err(format!(
            "the control directory {d} belongs to uid {}, not to uid {owner} (someone else may \
             have made it to stand in for lb's control socket); remove it, {fix}",
            entry.uid
        ));
    }
    if entry.mode & 0o022 != 0 {
        return Err(format!(
            "the control directory {d} is writable by others (mode {:o}); chmod go-w {d}, {fix}",
            entry.mode & 0o777
        ));
    }
    Ok(())
}

/// Makes `dir` (mode `mode`, for a master of `owner`) if it is missing, and
/// checks it with `check_dir` if it is not.
pub fn prepare_dir(dir: &Path, owner: u32, mode: u32) -> Result<(), String> {
    let made = match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(format!(
                "cannot make the control directory {}: {e}; make it (mode {mode:o}, owned by uid \
                 {owner}), or pass --control PATH",
                dir.display()
            ));
        }
    };
    // The umask may have taken bits the mode is meant to have (0755 for
    // /run/lb, so that `lb status` can say who it belongs to).
    if made {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            format!(
                "cannot set the mode of the control directory {}: {e}",
                dir.display()
            )
        })?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        format!(
            "cannot inspect the control directory {}: {e}",
            dir.display()
        )
    })?;
    check_dir(dir, Entry::from(&meta), owner)
}

/// Whether `$XDG_RUNTIME_DIR` (`dir`) may hold the socket of a master of
/// `uid`: what `check_dir` asks (after `su`, it may still be another
/// user's).
pub fn usable_xdg(dir: &Path, uid: u32) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| check_dir(dir, Entry::from(&m), uid).is_ok())
}

/// Where a master of `uid` keeps its socket for `port` when not told, the
/// directory made or checked first.
pub fn prepare_default(port: u16, uid: u32, xdg: Option<PathBuf>) -> Result<PathBuf, String> {
    let dir = if uid == 0 {
        let dir = PathBuf::from(ROOT_DIR);
        prepare_dir(&dir, 0, 0o755)?;
        dir
    } else if let Some(x) = xdg.filter(|x| usable_xdg(x, uid)) {
        x
    } else {
        let dir = tmp_dir(uid);
        prepare_dir(&dir, uid, 0o700)?;
        dir
    };
    Ok(dir.join(file_name(port)))
}

/// `prepare_default` for this process, after `$RUNTIME_DIRECTORY`.
pub fn server_default(port: u16) -> Result<PathBuf, String> {
    let uid = own_uid();
    match runtime_env() {
        Some(dir) => runtime_default(&dir, port, uid),
        None => prepare_default(port, uid, xdg_env()),
    }
}

/// The socket in the directory systemd made for the service: used as it
/// is (lb does not make it), if `check_dir` trusts it for `uid`.
pub fn runtime_default(dir: &Path, port: u16, uid: u32) -> Result<PathBuf, String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        format!(
            "cannot use $RUNTIME_DIRECTORY {}: {e}; set RuntimeDirectory= in the unit, or pass \
             --control PATH",
            dir.display()
        )
    })?;
    check_dir(dir, Entry::from(&meta), uid)?;
    Ok(dir.join(file_name(port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_entry(uid: u32, mode: u32) -> Entry {
        Entry {
            is_dir: true,
            is_symlink: false,
            uid,
            mode,
        }
    }

    #[test]
    fn root_looks_in_run_lb_only() {
        assert_eq!(
            search_order(8000, 0, Some(OsStr::new("/run/user/0"))),
            [PathBuf::from("/run/lb/lb-8000.sock")]
        );
    }

    #[test]
    fn a_user_looks_in_xdg_then_tmp_then_roots() {
        assert_eq!(
            search_order(8000, 1000, Some(OsStr::new("/run/user/1000"))),
            [
                PathBuf::from("/run/user/1000/lb-8000.sock"),
                PathBuf::from("/tmp/lb-1000/lb-8000.sock"),
                PathBuf::from("/run/lb/lb-8000.sock"),
            ]
        );
        // Unset, empty or relative: not a place to look.
        for xdg in [None, Some(""), Some("run/user")] {
            assert_eq!(
                search_order(9, 1000, xdg.map(OsStr::new)),
                [
                    PathBuf::from("/tmp/lb-1000/lb-9.sock"),
                    PathBuf::from("/run/lb/lb-9.sock"),
                ],
                "{xdg:?}"
            );
        }
    }

    #[test]
    fn runtime_directory_comes_first_and_once() {
        let rt = runtime_from(Some(OsStr::new("/run/lb:/run/lb-extra")));
        assert_eq!(rt, Some(PathBuf::from("/run/lb")));
        for bad in ["", "run/lb", ":/run/lb"] {
            assert_eq!(runtime_from(Some(OsStr::new(bad))), None, "{bad:?}");
        }
        assert_eq!(
            with_runtime(rt, 80, search_order(80, 0, None)),
            [PathBuf::from("/run/lb/lb-80.sock")]
        );
        assert_eq!(
            with_runtime(Some("/run/app".into()), 80, search_order(80, 1000, None)),
            [
                PathBuf::from("/run/app/lb-80.sock"),
                PathBuf::from("/tmp/lb-1000/lb-80.sock"),
                PathBuf::from("/run/lb/lb-80.sock"),
            ]
        );
    }

    #[test]
    fn without_a_port_the_one_other_socket_is_tried_last() {
        let base = scratch("lone");
        let want = base.join("lb-8000.sock");
        let order = vec![want.clone()];
        assert_eq!(lone_socket(&order), None, "nothing there");
        let _a = std::os::unix::net::UnixListener::bind(base.join("lb-80.sock")).unwrap();
        std::fs::write(base.join("lb-81.sock"), "").unwrap(); // not a socket
        std::fs::write(base.join("other.sock"), "").unwrap();
        assert_eq!(lone_socket(&order), Some(base.join("lb-80.sock")));
        let _b = std::os::unix::net::UnixListener::bind(base.join("lb-443.sock")).unwrap();
        assert_eq!(lone_socket(&order), None, "two: ambiguous");
        let _c = std::os::unix::net::UnixListener::bind(&want).unwrap();
        assert_eq!(
            lone_socket(&order),
            None,
            "still two besides the wanted one"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_runtime_directory_is_used_if_trusted_and_never_made() {
        let base = scratch("runtime");
        let me = own_uid();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            runtime_default(&base, 80, me).unwrap(),
            base.join("lb-80.sock")
        );
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = runtime_default(&base, 80, me).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        let missing = base.join("missing");
        let e = runtime_default(&missing, 80, me).unwrap_err();
        assert!(
            e.contains("$RUNTIME_DIRECTORY") && e.contains("--control"),
            "{e}"
        );
        assert!(!missing.exists(), "not made");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_directory_must_be_the_owners_and_not_writable_by_others() {
        let d = Path::new("/tmp/lb-1000");
        assert!(check_dir(d, dir_entry(1000, 0o700), 1000).is_ok());
        assert!(check_dir(d, dir_entry(1000, 0o755), 1000).is_ok());
        let e = check_dir(d, dir_entry(65534, 0o700), 1000).unwrap_err();
        assert!(e.contains("/tmp/lb-1000") && e.contains("uid 65534"), "{e}");
        assert!(e.contains("--control"), "{e}");
        for mode in [0o770, 0o1777, 0o702] {
            let e = check_dir(d, dir_entry(1000, mode), 1000).unwrap_err();
            assert!(e.contains("writable by others"), "{mode:o}: {e}");
        }
        let link = Entry {
            is_symlink: true,
            ..dir_entry(1000, 0o777)
        };
        assert!(check_dir(d, link, 1000).unwrap_err().contains("symlink"));
        let file = Entry {
            is_dir: false,
            ..dir_entry(1000, 0o600)
        };
        assert!(
            check_dir(d, file, 1000)
                .unwrap_err()
                .contains("not a directory")
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-path-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn prepare_makes_the_directory_with_its_mode_whatever_the_umask() {
        let base = scratch("make");
        let me = own_uid();
        for mode in [0o700, 0o755] {
            let dir = base.join(format!("{mode:o}"));
            prepare_dir(&dir, me, mode).unwrap();
            let meta = std::fs::symlink_metadata(&dir).unwrap();
            assert_eq!(meta.mode() & 0o7777, mode);
            assert_eq!(meta.uid(), me);
            // Again: it exists and is fine.
            prepare_dir(&dir, me, mode).unwrap();
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn prepare_refuses_what_it_did_not_make_and_cannot_trust() {
        let base = scratch("refuse");
        let me = own_uid();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&open, me, 0o700).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        assert_eq!(
            std::fs::symlink_metadata(&open).unwrap().mode() & 0o777,
            0o777,
            "left as it was"
        );
        let link = base.join("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        assert!(
            prepare_dir(&link, me, 0o700)
                .unwrap_err()
                .contains("symlink")
        );
        let e = prepare_dir(&base.join("missing/deeper"), me, 0o700).unwrap_err();
        assert!(e.contains("cannot make the control directory"), "{e}");
        if me == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = prepare_dir(&theirs, 0, 0o755).unwrap_err();
            assert!(e.contains("uid 65534"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_user_uses_xdg_only_if_it_is_their_own_private_directory() {
        let base = scratch("xdg");
        let xdg = base.join("xdg");
        std::fs::create_dir(&xdg).unwrap();
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Root can give it away and see the rule for another uid.
        let user = if own_uid() == 0 {
            std::os::unix::fs::chown(&xdg, Some(65534), None).unwrap();
            65534
        } else {
            own_uid()
        };
        assert!(usable_xdg(&xdg, user));
        assert!(!usable_xdg(&xdg, user + 1), "another user's (after su)");
        assert_eq!(
            prepare_default(80, user, Some(xdg.clone())).unwrap(),
            xdg.join("lb-80.sock")
        );
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!usable_xdg(&xdg, user), "writable by others");
        assert!(!usable_xdg(&base.join("missing"), user));
        let _ = std::fs::remove_dir_all(&base);
    }
}
