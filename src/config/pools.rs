//! The worker pools: the command after `--`, else the file's `[[pool]]`s,
//! else the bundled hello worker; each command resolved as `execvp` would.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::file::FilePool;
use super::run_as::{self, RunAs, Wanted};
use super::sources::Sources;
use super::{
    ConfigError, Mode, Origin, Pool, SendProxy, available_cpus, bounds, defaults, invalid, parse,
};

/// The pools, sized by `workers` (CLI > env > file `workers`) where they
/// set no `count`, and of `mode` (see [`super::settings::MODE`]).
pub fn pools(
    src: &Sources<'_>,
    workers: Option<(usize, Origin)>,
    mode: Option<(Mode, Origin)>,
    send_proxy: Option<(SendProxy, Origin)>,
    run_as: &Wanted,
) -> Result<Vec<Pool>, ConfigError> {
    let global_send_proxy = send_proxy.as_ref().map_or(SendProxy::Off, |s| s.0);
    let path_var = (src.env)("PATH");
    let file = &src.file;
    let path_text = &src.path;

    let pools = if !src.args.command.is_empty() {
        // A command on the command line replaces the file's pools.
        let (program, rest) = src.args.command.split_first().expect("non-empty");
        let command =
            resolve(program, path_var.as_deref()).map_err(|reason| ConfigError::Command {
                origin: "after --".into(),
                command: program.to_string_lossy().into_owned(),
                reason,
            })?;
        let mode = mode
            .as_ref()
            .map_or_else(|| Mode::detect(&command), |m| m.0);
        mode.check_args(rest)
            .map_err(|reason| ConfigError::Script {
                origin: "after --".into(),
                command: describe(program, rest),
                reason,
            })?;
        vec![Pool {
            name: "main".into(),
            command,
            args: rest.to_vec(),
            env: Vec::new(),
            count: workers.as_ref().map_or_else(available_cpus, |w| w.0),
            weight: defaults::WEIGHT,
            mode,
            port: None,
            send_proxy: global_send_proxy,
            stop_signal: libc::SIGTERM,
            run_as: run_as::resolve("main", inherit(run_as))?,
        }]
    } else if file.pool.is_empty() {
        let exe = std::env::current_exe().map_err(|e| ConfigError::Command {
            origin: "bundled hello worker".into(),
            command: "lb".into(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "was not found"
            } else {
                "cannot be located"
            },
        })?;
        vec![Pool {
            name: "hello".into(),
            command: exe,
            args: vec!["hello-worker".into()],
            env: Vec::new(),
            count: workers.as_ref().map_or_else(available_cpus, |w| w.0),
            weight: defaults::WEIGHT,
            mode: Mode::Native,
            port: None,
            send_proxy: global_send_proxy,
            stop_signal: libc::SIGTERM,
            run_as: run_as::resolve("hello", inherit(run_as))?,
        }]
    } else {
        let several = file.pool.len() > 1;
        if let Some((_, origin @ (Origin::Flag(_) | Origin::Env(_)))) = &workers
            && several
        {
            return Err(ConfigError::Conflict(format!(
                "{origin} sets the size of a single pool, but {path_text} defines {} pools; \
                 set `count` in each [[pool]] instead",
                file.pool.len()
            )));
        }
        file.pool
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let pool = file_pool(src, i, p, &workers, &mode, run_as, path_var.as_deref())?;
                file_send_proxy(src, p, &send_proxy, pool)
            })
            .collect::<Result<_, _>>()?
    };
    check_names(&pools, path_text)?;
    check_modes(&pools)?;
    Ok(pools.into_iter().map(absolute_command).collect())
}

/// Names `lb scale POOL` and `lb restart POOL` can tell apart: each pool's
/// own (a reload matches pools by name), and none a slot number.
fn check_names(pools: &[Pool], path_text: &str) -> Result<(), ConfigError> {
    for (i, p) in pools.iter().enumerate() {
        if let Some(j) = pools[..i].iter().position(|q| q.name == p.name) {
            return Err(ConfigError::Conflict(format!(
                "[[pool]] {} and [[pool]] {} in {path_text} are both named `{}`; give each pool a \
                 `name` of its own",
                j + 1,
                i + 1,
                p.name
            )));
        }
        if p.name.trim().is_empty() {
            return Err(ConfigError::Conflict(format!(
                "[[pool]] {} in {path_text} has an empty `name`; give it a name, or leave \
                 `name` out for `pool{i}`",
                i + 1
            )));
        }
        if p.name == "." || p.name == ".." {
            return Err(ConfigError::Conflict(format!(
                "[[pool]] {} in {path_text} is named `{}`, which a worker log pattern's `{{pool}}` \
                 would turn into a directory outside the logs; give it another name",
                i + 1,
                p.name
            )));
        }
        if p.name.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::Conflict(format!(
                "[[pool]] {} in {path_text} is named `{}`, which `lb restart` would take for a \
                 slot number; give it a name with a letter in it",
                i + 1,
                p.name
            )));
        }
    }
    Ok(())
}

/// The `i`th `[[pool]]` of the file.
fn file_pool(
    src: &Sources<'_>,
    i: usize,
    p: &FilePool,
    workers: &Option<(usize, Origin)>,
    mode: &Option<(Mode, Origin)>,
    run_as: &Wanted,
    path_var: Option<&str>,
) -> Result<Pool, ConfigError> {
    let path_text = &src.path;
    let name = p.name.clone().unwrap_or_else(|| format!("pool{i}"));
    let key = |k: &'static str| src.in_file(k);
    let count = match (workers, p.count) {
        (Some((n, Origin::Flag(_) | Origin::Env(_))), _) => *n,
        (_, Some(c)) => pool_count(c, key("count"))?,
        (Some((n, _)), None) => *n,
        (None, None) => available_cpus(),
    };
    let weight = p.weight.unwrap_or(defaults::WEIGHT);
    if !(1..=bounds::WEIGHT_MAX).contains(&weight) {
        return Err(invalid(
            key("weight"),
            &weight.to_string(),
            format!("give a pool's weight from 1 to {}", bounds::WEIGHT_MAX),
        ));
    }
    if p.port == Some(0) {
        return Err(invalid(
            key("port"),
            "0",
            "give the port the server binds, from 1 to 65535 (or leave it out for lb's own)",
        ));
    }
    let command =
        resolve(OsStr::new(&p.command), path_var).map_err(|reason| ConfigError::Command {
            origin: format!("pool `{name}` in {path_text}"),
            command: p.command.clone(),
            reason,
        })?;
    // No process can be given these: every start would fail.
    if let Some(arg) = p.args.iter().find(|a| a.contains('\0')) {
        return Err(invalid(
            key("args"),
            arg,
            "an argument cannot contain a NUL character",
        ));
    }
    if let Some((k, v)) = p
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(invalid(
            key("env"),
            &format!("{k}={v}"),
            "give variables as NAME = \"value\": a name that is not empty and has no `=`, \
             no NUL character in either",
        ));
    }
    let args: Vec<OsString> = p.args.iter().map(OsString::from).collect();
    let mode = match (mode, &p.mode) {
        (Some((m, Origin::Flag(_) | Origin::Env(_))), _) => *m,
        (_, Some(text)) => {
            Mode::parse(text).ok_or_else(|| invalid(key("mode"), text, Mode::CHOICES))?
        }
        (Some((m, _)), None) => *m,
        (None, None) => Mode::detect(&command),
    };
    mode.check_args(&args)
        .map_err(|reason| ConfigError::Script {
            origin: format!("pool `{name}` in {path_text}"),
            command: describe(OsStr::new(&p.command), &args),
            reason,
        })?;
    let run_as = pool_run_as(src, &name, p, run_as)?;
    Ok(Pool {
        name,
        command,
        args,
        env: p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        count,
        weight,
        mode,
        port: p.port,
        send_proxy: SendProxy::Off,
        stop_signal: match &p.stop_signal {
            None => libc::SIGTERM,
            Some(name) => parse::signal(name).ok_or_else(|| {
                invalid(
                    key("stop_signal"),
                    name,
                    "give a signal name like SIGTERM, SIGQUIT or SIGINT",
                )
            })?,
        },
        run_as,
    })
}

/// A `[[pool]]`'s `send_proxy`: from the command line or the environment
/// for every pool, else the pool's own key, else the file's (as `mode` is).
fn file_send_proxy(
    src: &Sources<'_>,
    p: &FilePool,
    global: &Option<(SendProxy, Origin)>,
    mut pool: Pool,
) -> Result<Pool, ConfigError> {
    pool.send_proxy = match (global, &p.send_proxy) {
        (Some((v, Origin::Flag(_) | Origin::Env(_))), _) => *v,
        (_, Some(text)) => SendProxy::parse(text)
            .ok_or_else(|| invalid(src.in_file("send_proxy"), text, SendProxy::CHOICES))?,
        (Some((v, _)), None) => *v,
        (None, None) => SendProxy::Off,
    };
    Ok(pool)
}

/// The settings outside the pools, as the single pool takes them.
fn inherit(global: &Wanted) -> Wanted {
    Wanted {
        user: global.user.clone(),
        group: global.group.clone(),
        cwd: global.cwd.clone(),
        umask: global.umask.clone(),
    }
}

/// A `[[pool]]`'s `user`, `group`, `cwd` and `umask`: from the command line
/// or the environment for every pool, else the pool's own key, else the
/// file's (as `mode` is).
fn pool_run_as(
    src: &Sources<'_>,
    name: &str,
    p: &FilePool,
    global: &Wanted,
) -> Result<RunAs, ConfigError> {
    fn pick<T: Clone>(
        global: &Option<(T, Origin)>,
        own: Option<T>,
        origin: Origin,
    ) -> Option<(T, Origin)> {
        match (global, own) {
            (Some((v, o @ (Origin::Flag(_) | Origin::Env(_)))), _) => Some((v.clone(), o.clone())),
            (_, Some(v)) => Some((v, origin)),
            (g, None) => g.clone(),
        }
    }
    let key = |k: &'static str| src.in_file(k);
    let text = |v: &Option<String>, k: &'static str, example: &str| {
        v.as_deref()
            .map(|v| run_as::name(v, example).map_err(|e| invalid(key(k), v, e)))
            .transpose()
    };
    let user = text(&p.user, "user", "a user name or uid, e.g. www-data")?;
    let group = text(&p.group, "group", "a group name or gid, e.g. www-data")?;
    let umask = p
        .umask
        .as_ref()
        .map(|u| run_as::umask(&u.text()).map_err(|e| invalid(key("umask"), &u.text(), e)))
        .transpose()?;
    let wanted = Wanted {
        user: pick(&global.user, user, key("user")),
        group: pick(&global.group, group, key("group")),
        cwd: pick(&global.cwd, p.cwd.as_ref().map(PathBuf::from), key("cwd")),
        umask: pick(&global.umask, umask, key("umask")),
    };
    run_as::resolve(name, wanted)
}

/// With a `cwd`, the command as lb found it, whatever directory the worker
/// starts in (`./app` is lb's, not the worker's).
fn absolute_command(mut p: Pool) -> Pool {
    if p.run_as.cwd.is_some()
        && let Ok(abs) = std::path::absolute(&p.command)
    {
        p.command = abs;
    }
    p
}

/// A pool's `count`, bounded as `--workers` is.
fn pool_count(c: usize, origin: Origin) -> Result<usize, ConfigError> {
    parse::count(&c.to_string()).map_err(|expected| invalid(origin, &c.to_string(), expected))
}

/// Modes that cannot work with a pool's command, or with each other.
fn check_modes(pools: &[Pool]) -> Result<(), ConfigError> {
    for p in pools {
        if p.send_proxy != SendProxy::Off && p.mode != Mode::Proxy {
            return Err(ConfigError::Conflict(format!(
                "pool `{}` is mode {} but sets send_proxy {}: only proxy mode writes a PROXY \
                 header to the worker (the others get the client's address from lb itself, \
                 docs/proxy-protocol.md); drop send_proxy there, or use mode proxy",
                p.name, p.mode, p.send_proxy
            )));
        }
        if p.mode == Mode::Shim
            && let Some(reason) = crate::shim::unsupported(&p.command)
        {
            return Err(ConfigError::Conflict(format!(
                "pool `{}`: `{}` {reason}; shim mode cannot work with it: use mode proxy (it \
                 listens on a port of its own, given as {{port}} or PORT), or mode shared if it \
                 can accept from an inherited listener (LISTEN_FDS)",
                p.name,
                p.command.display()
            )));
        }
    }
    if pools.iter().any(|p| !p.mode.dispatched()) && pools.iter().any(|p| p.mode.dispatched()) {
        return Err(ConfigError::Conflict(
            "mode shared cannot be mixed with other modes: shared workers accept from lb's \
             listener themselves, so lb could not also hand connections out; give every pool \
             mode shared, or none"
                .into(),
        ));
    }
    Ok(())
}

/// `program args…`, for messages.
fn describe(program: &OsStr, args: &[OsString]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Finds `program` the way `execvp` would: as given if it has a `/`, else in
/// each `PATH` directory. The result must be an executable regular file.
fn resolve(program: &OsStr, path_var: Option<&str>) -> Result<PathBuf, &'static str> {
    fn executable(p: &Path) -> Option<bool> {
        let meta = std::fs::metadata(p).ok()?;
        Some(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    }
    if program.is_empty() {
        return Err("is empty");
    }
    let as_path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return match executable(as_path) {
            Some(true) => Ok(as_path.to_path_buf()),
            Some(false) => Err("is not an executable file"),
            None => Err("does not exist"),
        };
    }
    let mut found_non_exec = false;
    for dir in path_var
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
    {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        match executable(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => found_non_exec = true,
            None => {}
        }
    }
    Err(if found_non_exec {
        "is in PATH but not executable"
    } else {
        "was not found in PATH"
    })
}

#[cfg(test)]
mod tests {
    /// The refusal for a file of `[[pool]]`s named `names` (`None`: no `name`).
    fn load(names: &[Option<&str>]) -> Result<(), String> {
        use clap::Parser;
        let text: String = names
            .iter()
            .map(|n| match n {
                Some(n) => format!("[[pool]]\nname = \"{n}\"\ncommand = \"sh\"\ncount = 1\n"),
                None => "[[pool]]\ncommand = \"sh\"\ncount = 1\n".into(),
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("lb-pool-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.toml", names.len()));
        std::fs::write(&file, text).unwrap();
        let args = crate::cli::Cli::try_parse_from(["lb", "-c", file.to_str().unwrap()])
            .unwrap()
            .start;
        let path = std::env::var("PATH").ok();
        let env = |k: &str| (k == "PATH").then(|| path.clone()).flatten();
        let result = super::super::load(&args, &env);
        let _ = std::fs::remove_file(&file);
        result
            .map(|_| ())
            .map_err(|e| e.to_string().replace(file.to_str().unwrap(), "lb.toml"))
    }

    #[test]
    fn pools_are_told_apart_by_name() {
        assert_eq!(load(&[Some("web"), Some("canary"), None]), Ok(()));
        assert_eq!(
            load(&[Some("web"), Some("canary"), Some("web")]),
            Err(
                "[[pool]] 1 and [[pool]] 3 in lb.toml are both named `web`; give each pool a \
                 `name` of its own"
                    .into()
            )
        );
        // A default name counts too.
        assert_eq!(
            load(&[Some("pool1"), None]),
            Err(
                "[[pool]] 1 and [[pool]] 2 in lb.toml are both named `pool1`; give each pool a \
                 `name` of its own"
                    .into()
            )
        );
        assert_eq!(
            load(&[Some("web"), Some(" ")]),
            Err(
                "[[pool]] 2 in lb.toml has an empty `name`; give it a name, or leave `name` \
                 out for `pool1`"
                    .into()
            )
        );
        assert_eq!(
            load(&[Some("web"), Some("3"), Some("x")]),
            Err(
                "[[pool]] 2 in lb.toml is named `3`, which `lb restart` would take for a slot \
                 number; give it a name with a letter in it"
                    .into()
            )
        );
    }
}
