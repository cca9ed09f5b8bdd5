//! Who a pool's workers run as and where: `user`, `group`, `cwd`, `umask`.
//! Names are resolved to ids here, at load, because the child between fork
//! and exec may not call getpwnam (it is not async-signal-safe); what lb
//! cannot do (switch user without the privilege, a user that does not
//! exist, a cwd that is not a directory) is refused here in one line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Origin, invalid};

/// What a pool's workers run as; `Default` is lb's own of everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    /// The identity to switch to; `None`: lb's own (also when it is asked
    /// for but already lb's).
    pub ids: Option<Ids>,
    /// Absolute.
    pub cwd: Option<PathBuf>,
    pub umask: Option<u32>,
}

/// A resolved identity: what the child's setgroups/setgid/setuid take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, as initgroups would set them;
    /// just `gid` when only a group is given).
    pub groups: Vec<u32>,
    /// `www-data (uid 33)`, for messages.
    pub describe: String,
}

/// What a pool asked for, with where each came from.
#[derive(Debug, Default)]
pub struct Wanted {
    pub user: Option<(String, Origin)>,
    pub group: Option<(String, Origin)>,
    pub cwd: Option<(PathBuf, Origin)>,
    pub umask: Option<(u32, Origin)>,
}

/// `umask` in lb.toml: `0o027` (a TOML integer) or `"027"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Octal {
    Number(u32),
    Text(String),
}

impl Octal {
    /// As `--umask` takes it.
    pub fn text(&self) -> String {
        match self {
            Octal::Number(n) => format!("0o{n:o}"),
            Octal::Text(t) => t.clone(),
        }
    }
}

/// A user or group as given: not empty, no NUL.
pub fn name(value: &str, example: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() || v.contains('\0') {
        return Err(format!("give {example}"));
    }
    Ok(v.to_string())
}

/// An umask in octal: `027`, `0027`, `0o027`; at most 0777.
pub fn umask(value: &str) -> Result<u32, String> {
    let v = value.trim();
    let digits = v.strip_prefix("0o").unwrap_or(v);
    match u32::from_str_radix(digits, 8) {
        Ok(n) if n <= 0o777 && !digits.is_empty() => Ok(n),
        _ => Err("give an octal mode from 000 to 777, e.g. 027 or 0o022".into()),
    }
}

/// The ids of what is asked for, checked against what lb may do.
pub fn resolve(pool: &str, wanted: Wanted) -> Result<RunAs, ConfigError> {
    let user = wanted
        .user
        .map(|(u, origin)| lookup_user(&u, &origin).map(|found| (found, u, origin)))
        .transpose()?;
    let group = wanted
        .group
        .map(|(g, origin)| lookup_group(&g, &origin).map(|gid| (gid, g)))
        .transpose()?;
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let ids = match (user, group) {
        (None, None) => None,
        (Some((u, given, _)), group) => {
            let gid = group.as_ref().map_or(u.gid.as_raw(), |g| g.0);
            let groups = user_groups(&u.name, gid);
            Some(Ids {
                uid: u.uid.as_raw(),
                gid,
                groups,
                describe: match &group {
                    Some((_, g)) => {
                        format!("user `{given}` (uid {}), group `{g}` (gid {gid})", u.uid)
                    }
                    None => format!("user `{given}` (uid {})", u.uid),
                },
            })
        }
        (None, Some((gid, given))) => Some(Ids {
            uid: euid,
            gid,
            groups: vec![gid],
            describe: format!("group `{given}` (gid {gid})"),
        }),
    };
    // Already lb's own: nothing to switch (and an unprivileged lb may run
    // a config that names its own user).
    let ids = ids.filter(|i| !(i.uid == euid && i.gid == egid && euid != 0));
    if let Some(i) = &ids
        && !can_switch()
    {
        return Err(ConfigError::Conflict(format!(
            "pool `{pool}`: cannot run workers as {}: lb (uid {euid}) lacks the privilege to \
             switch user (CAP_SETUID and CAP_SETGID); start lb as root, or remove `user`/`group`",
            i.describe
        )));
    }
    let cwd = match wanted.cwd {
        None => None,
        Some((dir, origin)) => Some(directory(&dir, &origin)?),
    };
    Ok(RunAs {
        ids,
        cwd,
        umask: wanted.umask.map(|u| u.0),
    })
}

fn lookup_user(u: &str, origin: &Origin) -> Result<nix::unistd::User, ConfigError> {
    let found = match u.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(uid.into()),
        Err(_) => nix::unistd::User::from_name(u),
    };
    match found {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(invalid(
            origin.clone(),
            u,
            "no such user on this machine (see `getent passwd`); create it or name another",
        )),
        Err(e) => Err(invalid(
            origin.clone(),
            u,
            format!("cannot look the user up ({e}); check /etc/passwd and nsswitch.conf"),
        )),
    }
}

fn lookup_group(g: &str, origin: &Origin) -> Result<u32, ConfigError> {
    let found = match g.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(gid.into()),
        Err(_) => nix::unistd::Group::from_name(g),
    };
    match found {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(invalid(
            origin.clone(),
            g,
            "no such group on this machine (see `getent group`); create it or name another",
        )),
        Err(e) => Err(invalid(
            origin.clone(),
            g,
            format!("cannot look the group up ({e}); check /etc/group and nsswitch.conf"),
        )),
    }
}

/// The user's groups as initgroups(3) would set them, `gid` first.
fn user_groups(name: &str, gid: u32) -> Vec<u32> {
    let listed = std::ffi::CString::new(name)
        .ok()
        .and_then(|n| nix::unistd::getgrouplist(&n, gid.into()).ok())
        .unwrap_or_default();
    let mut groups = vec![gid];
    groups.extend(listed.into_iter().map(|g| g.as_raw()).filter(|&g| g != gid));
    groups
}

/// Whether this process may set its uid, gid and groups: CAP_SETUID and
/// CAP_SETGID in its effective set (root has them unless a container or
/// systemd's CapabilityBoundingSet= took them away).
fn can_switch() -> bool {
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return nix::unistd::geteuid().is_root();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SETGID) != 0 && caps & (1 << CAP_SETUID) != 0)
}

/// `dir`, absolute, if it is a directory.
fn directory(dir: &Path, origin: &Origin) -> Result<PathBuf, ConfigError> {
    let shown = dir.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => std::path::absolute(dir).map_err(|e| {
            invalid(
                origin.clone(),
                &shown,
                format!("cannot make it absolute: {e}"),
            )
        }),
        Ok(_) => Err(invalid(
            origin.clone(),
            &shown,
            "is not a directory; give the directory the workers are to start in",
        )),
        Err(e) => Err(invalid(
            origin.clone(),
            &shown,
            format!("{e}; give an existing directory for the workers to start in"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(f: &'static str) -> Origin {
        Origin::Flag(f)
    }

    #[test]
    fn umasks_are_octal() {
        assert_eq!(umask("027"), Ok(0o27));
        assert_eq!(umask("0o022"), Ok(0o22));
        assert_eq!(umask("0000"), Ok(0));
        assert_eq!(Octal::Number(0o27).text(), "0o27");
        for bad in ["", "8", "0o", "1000", "abc", "-1"] {
            assert!(umask(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_users_groups_and_cwds_are_refused_in_one_line() {
        let no_user = Wanted {
            user: Some(("no-such-user-lb".into(), flag("--user"))),
            ..Wanted::default()
        };
        let e = resolve("web", no_user).unwrap_err().to_string();
        assert!(e.contains("--user `no-such-user-lb`: no such user"), "{e}");
        let no_group = Wanted {
            group: Some(("no-such-group-lb".into(), flag("--group"))),
            ..Wanted::default()
        };
        let e = resolve("web", no_group).unwrap_err().to_string();
        assert!(e.contains("no such group"), "{e}");
        let file = Wanted {
            cwd: Some(("/etc/passwd".into(), flag("--cwd"))),
            ..Wanted::default()
        };
        let e = resolve("web", file).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let none = Wanted {
            cwd: Some(("/no/such/dir".into(), flag("--cwd"))),
            ..Wanted::default()
        };
        assert!(resolve("web", none).is_err());
    }

    #[test]
    fn lbs_own_user_needs_no_switch_and_root_resolves_with_its_groups() {
        let me = nix::unistd::geteuid();
        let own = Wanted {
            user: Some((me.to_string(), flag("--user"))),
            cwd: Some((".".into(), flag("--cwd"))),
            umask: Some((0o27, flag("--umask"))),
            ..Wanted::default()
        };
        let r = resolve("web", own).unwrap();
        assert!(r.cwd.unwrap().is_absolute());
        assert_eq!(r.umask, Some(0o27));
        if me.is_root() {
            // root to root is still set (its groups), and nobody resolves.
            let nobody = Wanted {
                user: Some(("nobody".into(), flag("--user"))),
                ..Wanted::default()
            };
            let ids = resolve("web", nobody).unwrap().ids.unwrap();
            assert_eq!(ids.uid, 65534);
            assert_eq!(ids.groups[0], ids.gid);
        } else {
            assert_eq!(r.ids, None);
            let root = Wanted {
                user: Some(("root".into(), flag("--user"))),
                ..Wanted::default()
            };
            let e = resolve("web", root).unwrap_err().to_string();
            assert!(e.contains("start lb as root"), "{e}");
        }
    }
}
