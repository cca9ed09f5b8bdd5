//! The `lb` binary: parse, run, map the outcome to an exit code.

use std::io::Write as _;
use std::process::ExitCode;

// A subcommand's output or a last error line, never a panic: stdout or
// stderr may be a closed pipe (`lb status | head -1`).
macro_rules! out {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stdout(), $($arg)*); }};
}
macro_rules! err {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stderr(), $($arg)*); }};
}

use clap::Parser;
use lb::cli::{Cli, Command, Target, TargetError};
use lb::control::{Request, client};
use lb::master::Outcome;

/// A control subcommand's failure, as its one line says it.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error(transparent)]
    Target(#[from] TargetError),
    /// No master answered, or it refused.
    #[error(transparent)]
    Control(#[from] client::ClientError),
}

/// The control sockets `target` names, from the process's environment.
fn control_path(target: &Target) -> Result<Vec<std::path::PathBuf>, ClientError> {
    Ok(target.sockets(&|k| std::env::var_os(k))?)
}

/// Runs a control subcommand: prints the answer, exit 0; or one line, exit 1.
fn control(target: &Target, request: Request, json: bool) -> ExitCode {
    let answer = control_path(target)
        .and_then(|path| client::call(&path, &request).map_err(ClientError::Control));
    match answer {
        Ok(r) if r.ok => {
            match (&r.status, json) {
                (Some(s), true) => {
                    out!("{}", serde_json::to_string_pretty(s).unwrap_or_default())
                }
                (Some(s), false) => {
                    let _ = write!(std::io::stdout(), "{}", client::render(s));
                }
                (None, _) => out!("{}", r.message.unwrap_or_else(|| "ok".into())),
            }
            ExitCode::SUCCESS
        }
        Ok(r) => {
            err!("lb: error: {}", r.error.unwrap_or_else(|| "refused".into()));
            ExitCode::from(1)
        }
        Err(e) => {
            err!("lb: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `lb scale [POOL] N|+N|-N` as a request, or why not.
fn scale_request(args: &[String]) -> Result<Request, String> {
    let (pool, count) = match args {
        [count] => (None, count),
        [pool, count] => (Some(pool.clone()), count),
        _ => return Err("give [POOL] N, +N or -N".into()),
    };
    let relative = count.starts_with(['+', '-']);
    match count.parse::<i64>() {
        Ok(count) => Ok(Request::Scale {
            pool,
            count,
            relative,
        }),
        // `lb scale web`: a pool's name, its count left out.
        Err(_) if pool.is_none() && count.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            Err(format!(
                "invalid count `{count}`: give N, +N or -N (after the pool's name: lb scale \
             {count} N)"
            ))
        }
        Err(_) => Err(format!("invalid count `{count}`: give N, +N or -N")),
    }
}

/// Writes generated text to stdout: exit 1 with one line if it cannot
/// (a full disk under `lb man > lb.1`), never a panic.
fn print_all(text: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!("lb: error: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

/// `lb upgrade`: asks for the re-exec, then waits for the new image to
/// answer on the same socket, and says what runs now.
fn upgrade(target: &Target) -> ExitCode {
    let path = match control_path(target) {
        Ok(p) => p,
        Err(e) => {
            err!("lb: error: {e}");
            return ExitCode::from(1);
        }
    };
    let before = match client::call(&path, &Request::Status) {
        Ok(r) => r.status.map(|s| (s.pid, s.upgrades)),
        Err(e) => {
            err!("lb: error: {e}");
            return ExitCode::from(1);
        }
    };
    match client::call(&path, &Request::Upgrade) {
        Ok(r) if r.ok => {}
        Ok(r) => {
            err!("lb: error: {}", r.error.unwrap_or_else(|| "refused".into()));
            return ExitCode::from(1);
        }
        Err(e) => {
            err!("lb: error: {e}");
            return ExitCode::from(1);
        }
    }
    match client::wait_upgraded(&path, before.map_or(0, |b| b.1)) {
        Ok(s) => {
            out!(
                "upgraded: master pid {} now runs {} (lb {}); {} workers kept",
                s.pid,
                s.exe,
                s.version,
                s.workers.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            err!("lb: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `lb upgrade-check`: this binary's answer to a master about to exec it.
fn upgrade_check(
    state: u32,
    control: Option<std::path::PathBuf>,
    args: Vec<std::ffi::OsString>,
) -> ExitCode {
    let reads = lb::upgrade::state::OLDEST..=lb::upgrade::state::VERSION;
    if !reads.contains(&state) {
        err!(
            "lb: error: this lb reads upgrade state formats {} to {}, not {state}",
            reads.start(),
            reads.end()
        );
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse_from(std::iter::once("lb".into()).chain(args)) {
        Ok(c) => c,
        Err(e) => {
            err!(
                "lb: error: the master's arguments: {}",
                e.to_string().lines().next().unwrap_or("")
            );
            return ExitCode::from(2);
        }
    };
    match lb::config::load(&cli.start, &|k| std::env::var(k).ok()) {
        Ok(config) => {
            // What the new image checks at its start, checked now: a
            // failure there would lose the workers it was to take over.
            if let Some(control) = &control {
                let limit =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .ok()
                        .map(|(_, hard)| hard);
                if let Err(e) = lb::config::preflight(&config, control, limit) {
                    err!("lb: error: the configuration: {e}");
                    return ExitCode::from(2);
                }
            }
            let report = lb::upgrade::check::report(&config);
            out!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            err!("lb: error: the configuration: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::HelloWorker) => lb::worker::hello::main(),
        Some(Command::ReapGroups) => lb::supervisor::reaper::main(),
        Some(Command::Completions { shell }) => {
            let mut out = Vec::new();
            lb::manual::completions(shell, &mut out);
            print_all(&out)
        }
        Some(Command::Man) => {
            let mut out = Vec::new();
            match lb::manual::man(&mut out) {
                Ok(()) => print_all(&out),
                Err(e) => {
                    err!("lb: error: cannot render the manual: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Status { json, target }) => control(&target, Request::Status, json),
        Some(Command::Stop { target }) => control(&target, Request::Stop, false),
        Some(Command::Upgrade { target }) => upgrade(&target),
        Some(Command::UpgradeCheck {
            state,
            control_socket,
            args,
        }) => upgrade_check(state, control_socket, args),
        Some(Command::Reload { wait, target }) => {
            // What runs now is what the reload replaces.
            let before = if wait {
                match control_path(&target)
                    .and_then(|p| client::worker_pids(&p).map_err(ClientError::Control))
                {
                    Ok(pids) => pids,
                    Err(e) => {
                        err!("lb: error: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                Vec::new()
            };
            let code = control(&target, Request::Reload, false);
            if !wait || code != ExitCode::SUCCESS {
                return code;
            }
            let gone = control_path(&target)
                .and_then(|path| client::wait_gone(&path, &before).map_err(ClientError::Control));
            match gone {
                Ok(()) => {
                    out!("every replaced worker has drained and exited");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    err!("lb: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Scale { args, target }) => match scale_request(&args) {
            Ok(request) => control(&target, request, false),
            Err(why) => {
                err!("lb: error: {why}");
                ExitCode::from(2)
            }
        },
        Some(Command::Restart { what, wait, target }) => {
            control(&target, Request::Restart { target: what, wait }, false)
        }
        Some(Command::Send {
            slot,
            message,
            target,
        }) => {
            let slot = match slot.as_str() {
                "all" => None,
                s => match s.parse() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        err!("lb: error: invalid slot `{s}`: give a slot number or `all`");
                        return ExitCode::from(2);
                    }
                },
            };
            control(&target, Request::Send { slot, message }, false)
        }
        None => {
            let config = match lb::config::load(&cli.start, &|k| std::env::var(k).ok()) {
                Ok(c) => c,
                Err(e) => {
                    err!("lb: error: {e}");
                    return ExitCode::from(2);
                }
            };
            let args = cli.start.clone();
            let reconfigure = Box::new(move || lb::config::load(&args, &|k| std::env::var(k).ok()));
            // Started by `lb upgrade`: what the last image handed over.
            let inherited = match lb::upgrade::inherited() {
                Ok(s) => s,
                Err(e) => {
                    err!(
                        "lb: error: upgrade: cannot read the state the last image handed over: {e}"
                    );
                    return ExitCode::from(1);
                }
            };
            let outcome = lb::master::run(config, reconfigure, inherited);
            // The log's last lines first (bounded: a stuck stderr gets 2 s).
            lb::log::flush(std::time::Duration::from_secs(2));
            match outcome {
                Ok(Outcome::Drained) => ExitCode::SUCCESS,
                Ok(Outcome::Forced) => ExitCode::from(1),
                // Bad input found at start, before anything started.
                Err(e @ lb::master::MasterError::Config(_)) => {
                    lb::log::fatal(&e);
                    ExitCode::from(2)
                }
                Err(e) => {
                    lb::log::fatal(&e);
                    ExitCode::from(1)
                }
            }
        }
    }
}
