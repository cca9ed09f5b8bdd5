//! The `lb` master as a child process: start it, read its log, signal
//! it, wait for it, and always end it (by pid) when a test is done.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{WAIT, lb_bin, scratch};

/// A control socket path of the test's own unless the arguments name one,
/// so that masters the tests kill leave nothing in /tmp.
fn private_control(args: &[&str]) -> Option<String> {
    if args.contains(&"--control") {
        return None;
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = scratch("control").join(format!("lb-{n}.sock"));
    Some(path.to_str().unwrap().to_string())
}

/// The log lines a process wrote to stderr, as they arrive: their text
/// (`lb: …` or `[worker …] …`, without the timestamp, level and pool that
/// lead it, or taken out of a JSON line), and each line as written.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>, Arc<Mutex<Vec<String>>>);

/// A log line's text: what the tests match.
pub fn text_of(line: &str) -> String {
    if line.starts_with('{')
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
    {
        if let Some(msg) = v["msg"].as_str() {
            return format!("lb: {msg}");
        }
        if let Some(text) = v["line"].as_str() {
            let stream = if v["stream"] == "stderr" {
                " stderr"
            } else {
                ""
            };
            return format!("[worker {} pid {}{stream}] {text}", v["slot"], v["pid"]);
        }
    }
    let mut rest = line;
    if let Some(r) = rest.strip_prefix('<').and_then(|r| r.get(2..)) {
        rest = r;
    }
    if let Some((first, r)) = rest.split_once(' ')
        && first.len() >= 20
        && first.ends_with('Z')
        && first.as_bytes()[10] == b'T'
    {
        rest = r;
    }
    for level in ["INFO  ", "WARN  ", "ERROR "] {
        if let Some(r) = rest.strip_prefix(level) {
            rest = r;
            if let Some(r) = rest.strip_prefix("pool=") {
                rest = r.split_once(' ').map_or("", |(_, r)| r);
            }
            break;
        }
    }
    rest.to_string()
}

impl Log {
    fn push(&self, line: String) {
        let (lines, cv) = &*self.0;
        lines.lock().unwrap().push(text_of(&line));
        self.1.lock().unwrap().push(line);
        cv.notify_all();
    }

    /// The lines as lb wrote them.
    pub fn raw_lines(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds for the lines so far.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let (lines, cv) = &*self.0;
        let deadline = Instant::now() + WAIT;
        let mut guard = lines.lock().unwrap();
        loop {
            if pred(&guard) {
                return guard.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; log:\n{}",
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}

/// A running `lb` master. Dropping it stops it (SIGTERM, then SIGKILL) and
/// waits for it; its workers die with it.
pub struct Lb {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub log: Log,
    /// The private control socket `Lb::start` gave it.
    pub control: Option<String>,
}

/// Builds the command with an environment free of the caller's LB_* and
/// SCHED_POLICY, so the tests see only what they set.
pub fn lb_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    lb_command_through(&[], args, env)
}

/// `lb_command` run by `launcher` (a program and its arguments, to which
/// lb's path and `args` are appended; it is to exec lb).
pub fn lb_command_through(launcher: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let cmd = match launcher.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(lb_bin());
            c
        }
        None => Command::new(lb_bin()),
    };
    lb_clean(cmd, args, env)
}

/// `lb_command` with lb run from `program` (a copy of the binary).
pub fn lb_command_at(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    lb_clean(Command::new(program), args, env)
}

fn lb_clean(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("LB_") || k == "SCHED_POLICY" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Collects a child's stderr lines into a `Log`, echoing them for failures.
fn capture(child: &mut Child) -> Log {
    capture_to_eof(child).0
}

/// `capture`, and the reader thread, which ends at the pipe's EOF.
fn capture_to_eof(child: &mut Child) -> (Log, std::thread::JoinHandle<()>) {
    let log = Log::default();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("  | {line}");
            sink.push(line);
        }
    });
    (log, reader)
}

impl Lb {
    /// Starts `lb` on an ephemeral port and waits until `workers` workers
    /// reported READY.
    pub fn start(args: &[&str], env: &[(&str, &str)], workers: usize) -> Lb {
        let control = private_control(args);
        let mut full = vec!["--listen", "127.0.0.1:0"];
        if let Some(c) = &control {
            full.extend(["--control", c.as_str()]);
        }
        full.extend_from_slice(args);
        let mut lb = Lb::start_command(lb_command(&full, env), workers);
        lb.control = control;
        lb
    }

    /// Runs `cmd` (which must start lb with its stderr piped) and waits
    /// until `workers` workers are ready.
    pub fn start_command(mut cmd: Command, workers: usize) -> Lb {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start lb");
        let log = capture(&mut child);
        let lines = log.wait_for("the listening line", |l| {
            l.iter().any(|l| l.contains("listening on"))
        });
        let line = lines.iter().find(|l| l.contains("listening on")).unwrap();
        // The first TCP listener's (a Unix-only lb has none: port 0).
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split(" (policy").next())
            .and_then(|s| s.split(", ").find_map(|a| a.parse().ok()))
            .unwrap_or_else(|| {
                assert!(line.contains("unix:"), "no address in {line:?}");
                SocketAddr::from(([0, 0, 0, 0], 0))
            });
        let lb = Lb {
            child: Some(child),
            addr,
            log,
            control: None,
        };
        lb.wait_ready(workers);
        lb
    }

    /// Every address of the listening line (`HOST:PORT`, `unix:/PATH`), in
    /// order.
    pub fn listening(&self) -> Vec<String> {
        let lines = self.log.wait_for("the listening line", |l| {
            l.iter().any(|l| l.contains("listening on"))
        });
        let line = lines.iter().find(|l| l.contains("listening on")).unwrap();
        let list = line.split("listening on ").nth(1).unwrap();
        let list = &list[..list.find(" (policy").unwrap_or(list.len())];
        list.split(", ").map(str::to_string).collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `n` READY lines have been logged in all.
    pub fn wait_ready(&self, n: usize) {
        self.log.wait_for(&format!("{n} workers ready"), |l| {
            l.iter().filter(|l| l.ends_with(": ready")).count() >= n
        });
    }

    pub fn signal(&self, sig: i32) {
        send_signal(self.pid(), sig);
    }

    /// Waits (bounded) for the master to exit; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "lb did not exit in {WAIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn send_signal(pid: u32, sig: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::try_from(sig).unwrap(),
    );
}

/// Runs `lb` to completion (for start-up failures); bounded. Listens on an
/// ephemeral port unless the arguments say otherwise.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let control = private_control(args);
    let mut full = Vec::new();
    if !args.iter().any(|a| *a == "--listen" || *a == "-l") {
        full.extend(["--listen", "127.0.0.1:0"]);
    }
    if let Some(c) = &control {
        full.extend(["--control", c.as_str()]);
    }
    full.extend_from_slice(args);
    exit_of(lb_command(&full, env))
}

/// Runs `cmd` (lb, perhaps through a launcher, its stderr piped) to
/// completion; bounded. Its exit status and its log lines.
pub fn exit_of(mut cmd: Command) -> (ExitStatus, String) {
    let mut child = cmd.spawn().expect("start lb");
    let (log, reader) = capture_to_eof(&mut child);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb did not exit; log:\n{}", log.lines().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Every line lb wrote is read once the pipe is at EOF (bounded: a
    // process lb started might hold it a moment longer); a fixed pause
    // lost lines on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    (status, log.lines().join("\n"))
}

impl Lb {
    /// The pid of the latest process started in `slot` (from the log).
    pub fn pid_of_slot(&self, slot: usize) -> u32 {
        let prefix = format!("lb: worker {slot} pid ");
        self.log
            .lines()
            .iter()
            .rev()
            .find_map(|l| {
                l.strip_prefix(&prefix)?
                    .strip_suffix(": online")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no online line for worker {slot}"))
    }

    /// Sum of the counts in its "rescued N queued connections" lines.
    pub fn rescued(&self) -> u64 {
        self.log
            .lines()
            .iter()
            .filter_map(|l| {
                l.split("rescued ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Waits (bounded) until `needle` has been logged `n` times.
    pub fn wait_log(&self, needle: &str, n: usize) -> Vec<String> {
        self.log.wait_for(&format!("{n}× {needle:?}"), |l| {
            l.iter().filter(|l| l.contains(needle)).count() >= n
        })
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// CPU time (user + system) a process has used, in milliseconds.
pub fn cpu_millis(pid: u32) -> u64 {
    // /proc counts in USER_HZ, fixed at 100 by the Linux ABI on x86 and arm.
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based, whole line).
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 1000 / USER_HZ
}
