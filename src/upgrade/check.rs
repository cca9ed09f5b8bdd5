//! The new binary, tried before anything is given up: it is run as a child
//! (`lb upgrade-check`, with the master's own arguments) and must load the
//! configuration as the next image would and say it reads this image's
//! state format. A binary that does not run, an older lb that has no
//! `upgrade-check`, one whose state format is another, or a configuration
//! that now fails or names other pools or listeners: each refuses the
//! upgrade in one line, and the running master goes on.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state;

/// How long the check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the checked binary says of itself and of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Its version (`lb --version`'s).
    pub version: String,
    /// The state formats it reads.
    pub reads: (u32, u32),
    /// The configuration's pools' names, in order.
    pub pools: Vec<String>,
    /// The configuration's listeners, as written.
    pub listeners: Vec<String>,
    /// What else the next image builds its start on (lb sets each up
    /// once, at start: a reload keeps them): the pools' modes, the
    /// dispatch, the control socket, the metrics address, the log files.
    #[serde(default)]
    pub fixed: Vec<(String, String)>,
}

/// A checked binary, held open: what is exec'd is what was checked, even
/// if the path is replaced again meanwhile.
#[derive(Debug)]
pub struct Checked {
    pub binary: OwnedFd,
    pub version: String,
}

/// Runs `exe` as `lb upgrade-check` and compares what it reports with
/// `running` (this image's own configuration, as the same report).
pub fn check(exe: &Path, control: &Path, running: &Report) -> Result<Checked, String> {
    let name = exe.display();
    let binary = nix::fcntl::open(
        exe,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("cannot open the new binary {name}: {e}"))?;
    // The file held open, run through this process's fd: the binary run
    // is the one checked, whatever the path names by now.
    let held = format!("/proc/{}/fd/{}", std::process::id(), binary.as_raw_fd());
    if let Some(why) = head_of(&held).and_then(|(head, len)| elf_cut_short(&head, len)) {
        return Err(format!(
            "the new binary {name} is cut short: {why} (a copy not finished?)"
        ));
    }
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = Command::new(&held)
        .arg("upgrade-check")
        .arg("--state")
        .arg(state::VERSION.to_string())
        .arg("--control-socket")
        .arg(control)
        .arg("--")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("the new binary {name} cannot be run: {e}"))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new binary {name} did not finish its check in {} s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .trim_start_matches("lb: error: ")
        .to_string();
    if !status.success() {
        let why = if last.contains("upgrade-check") {
            "it has no `lb upgrade-check` (an lb older than upgrades, or not lb)".to_string()
        } else if last.is_empty() {
            format!("it exited with {status}")
        } else {
            last
        };
        return Err(format!("the new binary {name} failed its check: {why}"));
    }
    let report: Report = serde_json::from_str(out.trim()).map_err(|_| {
        format!("the new binary {name} failed its check: it did not answer as lb does")
    })?;
    compare(&report, running).map_err(|why| format!("the new binary {name}: {why}"))?;
    Ok(Checked {
        binary,
        version: report.version,
    })
}

/// A file's first 64 KiB (its ELF and program headers) and its length.
fn head_of(path: &str) -> Option<(Vec<u8>, u64)> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut head = Vec::with_capacity(64 * 1024);
    file.take(64 * 1024).read_to_end(&mut head).ok()?;
    Some((head, len))
}

/// Why an ELF file (`file`: its first bytes; `len`: its length) is shorter than its headers say, if it is: a truncated
/// binary may still run far enough to pass the check (its debug info comes
/// last), then die at the first page past its end. Files that are not
/// 64-bit little-endian ELF pass (the check itself judges them).
fn elf_cut_short(file: &[u8], len: u64) -> Option<String> {
    if file.len() < 64 || &file[..4] != b"\x7fELF" || file[4] != 2 || file[5] != 1 {
        return None;
    }
    let u16_at = |at: usize| {
        file.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let u32_at = |at: usize| {
        file.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let u64_at = |at: usize| {
        file.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (phoff, shoff) = (u64_at(32)?, u64_at(40)?);
    let (phentsize, phnum) = (u16_at(54)?, u16_at(56)?);
    let (shentsize, shnum) = (u16_at(58)?, u16_at(60)?);
    let sh_end = shoff.saturating_add(shentsize * shnum);
    if shnum > 0 && sh_end > len {
        return Some(format!(
            "{len} bytes, and its section headers end at {sh_end}"
        ));
    }
    for i in 0..phnum {
        let at = phoff.saturating_add(i * phentsize) as usize;
        // PT_LOAD: its bytes must all be in the file.
        if u32_at(at)? == 1 {
            let end = u64_at(at + 8)?.saturating_add(u64_at(at + 32)?);
            if end > len {
                return Some(format!("{len} bytes, and a loaded segment ends at {end}"));
            }
        }
    }
    None
}

/// Whether the new image could take over from the running one.
fn compare(new: &Report, running: &Report) -> Result<(), String> {
    if !(new.reads.0..=new.reads.1).contains(&state::VERSION) {
        return Err(format!(
            "it reads upgrade state formats {} to {}, and this lb writes {}: upgrade through \
             a version between them, or restart lb",
            new.reads.0,
            new.reads.1,
            state::VERSION
        ));
    }
    if new.pools != running.pools {
        return Err(format!(
            "the configuration it would load has pools {} and the running master {}: run `lb \
             reload` first (pools change by reload, not by upgrade)",
            new.pools.join(", "),
            running.pools.join(", ")
        ));
    }
    if new.listeners != running.listeners {
        return Err(format!(
            "the configuration it would load listens on {} and the running master on {}: \
             listeners are kept across an upgrade; restore them, or restart lb to change them",
            new.listeners.join(", "),
            running.listeners.join(", ")
        ));
    }
    for ((what, new_value), (_, running_value)) in new.fixed.iter().zip(&running.fixed) {
        if new_value != running_value {
            return Err(format!(
                "the configuration it would load has {what} {new_value} and the running master \
                 {running_value}: lb sets that up at start, so the new image would not match its \
                 workers; restore it, or restart lb to change it"
            ));
        }
    }
    if new.fixed.len() != running.fixed.len() {
        return Err("it reports its start-up settings differently: restart lb".into());
    }
    Ok(())
}

/// This binary's report on `config`.
pub fn report(config: &crate::config::Config) -> Report {
    Report {
        version: env!("CARGO_PKG_VERSION").to_string(),
        reads: (state::OLDEST, state::VERSION),
        pools: config.pools.iter().map(|p| p.name.clone()).collect(),
        listeners: config
            .listeners
            .iter()
            .map(|l| l.address.to_string())
            .collect(),
        fixed: fixed(config),
    }
}

/// The start-up settings of `config` the next image must share.
fn fixed(config: &crate::config::Config) -> Vec<(String, String)> {
    let shown = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or_else(|| "(none)".to_string(), |p| p.display().to_string())
    };
    let mut fixed: Vec<(String, String)> = config
        .pools
        .iter()
        .map(|p| (format!("pool `{}` mode", p.name), p.mode.to_string()))
        .collect();
    fixed.extend([
        ("dispatch".to_string(), config.dispatch.to_string()),
        ("control".to_string(), shown(&config.control)),
        (
            "metrics".to_string(),
            config
                .metrics
                .map_or_else(|| "(none)".to_string(), |m| m.to_string()),
        ),
        ("log_file".to_string(), shown(&config.log_file)),
        ("worker_log".to_string(), shown(&config.worker_log)),
    ]);
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            version: "1.0.0".into(),
            reads: (1, state::VERSION),
            pools: vec!["web".into()],
            listeners: vec!["127.0.0.1:8000".into()],
            fixed: vec![("pool `web` mode".into(), "native".into())],
        }
    }

    #[test]
    fn the_same_configuration_and_a_readable_format_pass() {
        assert_eq!(compare(&report(), &report()), Ok(()));
    }

    #[test]
    fn another_format_pools_or_listeners_are_refused_by_name() {
        let mut new = report();
        new.reads = (state::VERSION + 1, state::VERSION + 2);
        assert!(
            compare(&new, &report())
                .unwrap_err()
                .contains("state formats")
        );
        let mut new = report();
        new.pools.push("canary".into());
        let e = compare(&new, &report()).unwrap_err();
        assert!(e.contains("web, canary") && e.contains("lb reload"), "{e}");
        let mut new = report();
        new.listeners = vec!["[::]:8000".into()];
        let e = compare(&new, &report()).unwrap_err();
        assert!(e.contains("[::]:8000") && e.contains("restart lb"), "{e}");
        let mut new = report();
        new.fixed[0].1 = "shared".into();
        let e = compare(&new, &report()).unwrap_err();
        assert!(
            e.contains("pool `web` mode shared") && e.contains("native"),
            "{e}"
        );
    }

    #[test]
    fn a_truncated_binary_is_found_short() {
        let (head, len) = head_of("/proc/self/exe").unwrap();
        assert_eq!(elf_cut_short(&head, len), None);
        let why = elf_cut_short(&head, len / 2).unwrap();
        assert!(why.contains("bytes, and"), "{why}");
        assert_eq!(elf_cut_short(b"#!/bin/sh\nexit 0\n", 18), None);
    }

    #[test]
    fn a_binary_that_is_not_lb_is_refused_and_named() {
        let dir = std::env::temp_dir().join(format!("lb-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("lb");
        std::fs::write(&script, "#!/bin/sh\necho broken >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let control = dir.join("lb.sock");
        let e = check(&script, &control, &report()).unwrap_err();
        assert!(
            e.contains(&script.display().to_string()) && e.contains("broken"),
            "{e}"
        );
        let e = check(&dir.join("missing"), &control, &report()).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
