//! Checks run once at start, before lb listens: that what the
//! configuration names can be used. Each refusal is one line naming the
//! value, where it came from and the fix, as [`super::load`]'s are; the
//! master exits 2 on it, having started nothing.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{Config, ConfigError, invalid};

/// Open files each proxy relay costs: two pipes made at start, the client
/// and upstream sockets while it is open.
pub const FDS_PER_RELAY: u64 = 6;
/// Open files the master keeps besides the relays: its own (listener,
/// epoll, eventfds, signalfd, control socket, log) and, per worker, its
/// pidfd, channel and output pipes (twice over during a reload).
pub const FDS_BASE: u64 = 64;
pub const FDS_PER_WORKER: u64 = 8;
/// The longest path a Unix socket address holds (`sun_path`, less the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Checks `config`'s worker log (it can be opened for appending, and is
/// created if missing), the control socket at `control` (its directory
/// exists and is writable, the path is short enough and names no file
/// other than a socket) and, in proxy mode, that `open_files` (the limit
/// on open files, when known) holds the relays.
pub fn preflight(
    config: &Config,
    control: &Path,
    open_files: Option<u64>,
) -> Result<(), ConfigError> {
    let origins = &config.origins;
    let appendable = |path: &Path| {
        // Non-blocking: a FIFO with no reader is refused, not waited on.
        OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map(drop)
    };
    if let Some(path) = &config.log_file
        && let Err(e) = appendable(path)
    {
        return Err(invalid(
            origins.log_file.clone(),
            &path.display().to_string(),
            format!(
                "cannot open it for appending ({e}); give a file lb may write, in an existing \
                 directory"
            ),
        ));
    }
    if let Some(pattern) = &config.worker_log
        && let Some((file, e)) = worker_logs(config, pattern)
            .iter()
            .find_map(|f| appendable(f).err().map(|e| (f.clone(), e)))
    {
        let it = if &file == pattern {
            "it".to_string()
        } else {
            file.display().to_string()
        };
        return Err(invalid(
            origins.worker_log.clone(),
            &pattern.display().to_string(),
            format!(
                "cannot open {it} for appending ({e}); give a file lb may write, in an \
                 existing directory"
            ),
        ));
    }

    let refuse_control = |why: String| {
        invalid(
            origins.control.clone(),
            &control.display().to_string(),
            format!(
                "{why}; give the control socket a path of its own, in a directory lb may write"
            ),
        )
    };
    let len = control.as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(refuse_control(format!(
            "{len} bytes is longer than a Unix socket path may be ({SOCKET_PATH_MAX})"
        )));
    }
    match std::fs::symlink_metadata(control) {
        // The control server replaces a stale socket; anything else there
        // is not its to remove.
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(refuse_control("it exists and is not a socket".into()));
        }
        _ => {}
    }
    let dir = match control.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Err(e) => {
            return Err(refuse_control(format!(
                "its directory {} cannot be used ({e})",
                dir.display()
            )));
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(refuse_control(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    use nix::unistd::AccessFlags;
    if let Err(e) = nix::unistd::access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Err(refuse_control(format!(
            "lb cannot create files in {} ({})",
            dir.display(),
            e.desc()
        )));
    }

    if let Some(limit) = open_files
        && config.relays()
    {
        let rest = FDS_BASE + FDS_PER_WORKER * config.slots() as u64;
        let need = FDS_PER_RELAY * config.max_conns as u64 + rest;
        if need > limit {
            let fit = limit.saturating_sub(rest) / FDS_PER_RELAY;
            let fix = if fit >= 1 {
                format!("lower it to at most {fit} or raise the limit")
            } else {
                "raise the limit".into()
            };
            return Err(invalid(
                origins.max_conns.clone(),
                &config.max_conns.to_string(),
                format!(
                    "proxy mode's relays need {need} open files ({FDS_PER_RELAY} each, plus \
                     {rest} for lb and its workers), more than the limit of {limit}; {fix} \
                     (ulimit -n, systemd's LimitNOFILE=)"
                ),
            ));
        }
    }
    Ok(())
}

/// Every file the worker log pattern names for the configured workers.
fn worker_logs(config: &Config, pattern: &Path) -> Vec<std::path::PathBuf> {
    use crate::log::{Stream, pattern::expand};
    let mut files: Vec<_> = config
        .slot_pools()
        .into_iter()
        .enumerate()
        .flat_map(|(slot, pool)| {
            let name = &config.pools[pool].name;
            [Stream::Stdout, Stream::Stderr].map(|s| expand(pattern, name, slot, s))
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::StartArgs;
    use std::path::PathBuf;

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        let args: StartArgs =
            crate::cli::Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
                .unwrap()
                .start;
        let path = std::env::var("PATH").ok();
        super::super::load(&args, &|k| (k == "PATH").then(|| path.clone()).flatten()).unwrap()
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-preflight-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn check(args: &[&str], control: &Path, open_files: Option<u64>) -> Result<(), String> {
        preflight(&config(args), control, open_files).map_err(|e| e.to_string())
    }

    #[test]
    fn the_worker_log_must_open_for_appending() {
        let dir = scratch();
        let sock = dir.join("lb.sock");
        let log = dir.join("workers.log");
        let log = log.to_str().unwrap();
        check(&["--worker-log", log], &sock, None).unwrap();
        assert!(Path::new(log).exists(), "created");
        let d = dir.to_str().unwrap();
        let e = check(&["--worker-log", d], &sock, None).unwrap_err();
        assert!(
            e.starts_with(&format!("invalid --worker-log `{d}`: cannot open it")),
            "{e}"
        );
        let e = check(&["--worker-log", "/nonexistent-lb/w.log"], &sock, None).unwrap_err();
        assert!(e.contains("No such file") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn every_worker_log_the_pattern_names_and_the_log_file_must_open() {
        let dir = scratch();
        let sock = dir.join("lb.sock");
        let pattern = dir.join("w-{slot}.{stream}.log");
        check(
            &["-w", "2", "--worker-log", pattern.to_str().unwrap()],
            &sock,
            None,
        )
        .unwrap();
        for f in ["w-0.stdout.log", "w-1.stderr.log"] {
            assert!(dir.join(f).exists(), "{f} created");
        }
        std::fs::remove_file(dir.join("w-1.stdout.log")).unwrap();
        std::fs::create_dir(dir.join("w-1.stdout.log")).unwrap();
        let e = check(
            &["-w", "2", "--worker-log", pattern.to_str().unwrap()],
            &sock,
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("cannot open ") && e.contains("w-1.stdout.log for appending"),
            "{e}"
        );
        let d = dir.to_str().unwrap();
        let e = check(&["--log-file", d], &sock, None).unwrap_err();
        assert!(
            e.starts_with(&format!("invalid --log-file `{d}`: cannot open it")),
            "{e}"
        );
        check(
            &["--log-file", dir.join("lb.log").to_str().unwrap()],
            &sock,
            None,
        )
        .unwrap();
    }

    #[test]
    fn the_control_path_must_be_creatable_and_not_another_file() {
        let dir = scratch();
        let sock = dir.join("ok.sock");
        check(&[], &sock, None).unwrap();
        let e = check(
            &["--control", "/nonexistent-lb/lb.sock"],
            Path::new("/nonexistent-lb/lb.sock"),
            None,
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "invalid --control `/nonexistent-lb/lb.sock`: its directory /nonexistent-lb"
            ) && e.contains("No such file"),
            "{e}"
        );
        let e = check(&[], Path::new("/nonexistent-lb/lb.sock"), None).unwrap_err();
        assert!(e.starts_with("invalid --control (default)"), "{e}");
        // A regular file there is refused, and left alone.
        let file = dir.join("precious.txt");
        std::fs::write(&file, "keep me").unwrap();
        let e = check(&[], &file, None).unwrap_err();
        assert!(e.contains("exists and is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        let e = check(&[], &dir.join("x".repeat(200)), None).unwrap_err();
        assert!(e.contains("longer than a Unix socket path"), "{e}");
    }

    #[test]
    fn proxy_relays_must_fit_the_open_files_limit() {
        let sock = scratch().join("lb.sock");
        let proxy = ["--mode", "proxy", "-w", "2", "--", "sh"];
        // 6 × 1024 + 64 + 8 × 2 = 6224.
        check(&proxy, &sock, Some(6224)).unwrap();
        let e = check(&proxy, &sock, Some(6223)).unwrap_err();
        assert!(
            e.starts_with("invalid --max-conns (default) `1024`: proxy mode's relays need 6224")
                && e.contains("limit of 6223")
                && e.contains("at most 1023"),
            "{e}"
        );
        let mut args = proxy.to_vec();
        args.splice(0..0, ["--max-conns", "1048576"]);
        let e = check(&args, &sock, Some(1024)).unwrap_err();
        assert!(
            e.starts_with("invalid --max-conns `1048576`") && e.contains("limit of 1024"),
            "{e}"
        );
        let e = check(&args, &sock, Some(10)).unwrap_err();
        assert!(e.contains("; raise the limit"), "{e}");
        // Only proxy mode has relays.
        check(&["-w", "2", "--", "sh"], &sock, Some(100)).unwrap();
    }
}
