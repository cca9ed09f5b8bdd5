//! What PM2 and gunicorn users expect of a process manager: workers run as
//! another user, in a directory, with a umask; recycling with jitter;
//! `--watch`; shell completions and the manual.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// A copy of lb that any user may run (the tree it was built in may be
/// under a directory only root may enter, as /root is).
fn lb_for_anyone(name: &str) -> String {
    let dir = scratch(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join("lb");
    std::fs::copy(lb_bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy.to_str().unwrap().to_string()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `Key:` of /proc/<pid>/status, its fields.
fn proc_status(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The latest pid of each slot in `slots`.
fn pids(lb: &Lb, slots: usize) -> Vec<u32> {
    (0..slots).map(|s| lb.pid_of_slot(s)).collect()
}

#[test]
fn workers_run_as_their_pools_user_group_cwd_and_umask() {
    if !is_root() {
        eprintln!("skipped: switching the workers' user needs lb to run as root");
        return;
    }
    let lb_copy = lb_for_anyone("run-as");
    let app = scratch("run-as-app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = format!(
        "umask = \"007\"\n[[pool]]\nname = \"web\"\ncommand = \"{lb_copy}\"\nargs = [\"hello-worker\"]\ncount = 1\n\
         user = \"nobody\"\ngroup = \"nogroup\"\ncwd = \"{}\"\numask = \"027\"\n\
         [[pool]]\nname = \"admin\"\ncommand = \"{lb_copy}\"\nargs = [\"hello-worker\"]\ncount = 1\n",
        app.display()
    );
    let path = write_config(&scratch("run-as"), "lb.toml", &config);
    let lb = Lb::start(&["--config", &path], &[], 2);
    let nobody = lb.pid_of_slot(0);
    assert_eq!(proc_status(nobody, "Uid"), ["65534"; 4]);
    assert_eq!(proc_status(nobody, "Gid"), ["65534"; 4]);
    assert_eq!(proc_status(nobody, "Groups"), ["65534"]);
    assert_eq!(proc_status(nobody, "Umask"), ["0027"]);
    assert_eq!(
        std::fs::read_link(format!("/proc/{nobody}/cwd")).unwrap(),
        app
    );
    // The other pool keeps lb's own user, with the file's umask.
    let root = lb.pid_of_slot(1);
    assert_eq!(proc_status(root, "Uid"), ["0"; 4]);
    assert_eq!(proc_status(root, "Umask"), ["0007"]);
    // Its channel (fd 3) still works: it said READY, and it serves.
    let bodies: Vec<String> = (0..4).map(|_| get(lb.addr, "/")).collect();
    assert!(
        bodies.iter().any(|b| pid_of(b) == nobody),
        "the worker running as nobody served nothing: {bodies:?}"
    );
}

#[test]
fn what_lb_cannot_run_as_is_refused_in_one_line() {
    let refused = |args: &[&str], needle: &str| {
        let (code, stderr) = refusal(lb_command(args, &[]));
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(stderr.starts_with("lb: error: "), "{stderr}");
    };
    refused(
        &["--user", "no-such-user-lb"],
        "--user `no-such-user-lb`: no such user",
    );
    refused(&["--group", "no-such-group-lb"], "no such group");
    refused(&["--cwd", "/etc/passwd"], "is not a directory");
    refused(&["--umask", "999"], "give an octal mode");
    refused(
        &["--max-conns-per-worker-jitter", "10"],
        "set --max-conns-per-worker too",
    );
    refused(&["--watch", "/no/such/dir"], "does not exist");
    if !is_root() {
        refused(&["--user", "root"], "start lb as root");
        return;
    }
    // A worker user that may not enter the directory: the start fails
    // with a hint, and lb exits.
    let private = scratch("run-as-private");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let dir = private.to_str().unwrap();
    let (code, stderr) = refusal(lb_command(
        &[
            "--listen",
            "127.0.0.1:0",
            "--user",
            "nobody",
            "--cwd",
            dir,
            "--",
            "/bin/true",
        ],
        &[],
    ));
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("Permission denied") && last.contains("to enter its `cwd`"),
        "{stderr}"
    );

    // A master without the privilege to switch: as nobody, asked for root.
    let lb_copy = lb_for_anyone("refused");
    if !installed("setpriv", "the unprivileged master's refusal") {
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", &lb_copy])
        .args(["--listen", "127.0.0.1:0", "--user", "root"]);
    let (code, stderr) = refusal(cmd);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("lacks the privilege to switch user")
            && stderr.contains("start lb as root"),
        "{stderr}"
    );
}

/// Runs a master that is to refuse its configuration: its exit code and
/// all it wrote to stderr (bounded: one that starts is killed).
fn refusal(mut cmd: Command) -> (Option<i32>, String) {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let (status, log) = exit_of(cmd);
    (status.code(), log)
}

/// Limits drawn per worker: workers started together are replaced at
/// different counts (the log says each one's limit).
#[test]
fn recycling_limits_differ_from_worker_to_worker() {
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--max-conns-per-worker",
            "2",
            "--max-conns-per-worker-jitter",
            "1000",
        ],
        &[],
        2,
    );
    // Far below 2 + 1000: one worker recycles only if its draw is low;
    // what matters is the limits the log reports.
    let limits = |lb: &Lb| -> Vec<u64> {
        lb.log
            .lines()
            .iter()
            .filter_map(|l| l.split("(limit ").nth(1)?.split(')').next()?.parse().ok())
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    let mut served = 0;
    while limits(&lb).len() < 3 && Instant::now() < deadline {
        let _ = try_get(lb.addr, "/");
        served += 1;
    }
    let seen = limits(&lb);
    eprintln!("{served} requests; limits {seen:?}");
    assert!(seen.len() >= 3, "too few recycles in {WAIT:?}: {seen:?}");
    assert!(seen.iter().all(|l| (2..=1002).contains(l)), "{seen:?}");
    let first = seen[0];
    assert!(
        seen.iter().any(|&l| l != first),
        "every limit alike: {seen:?}"
    );
}

/// Writes `path` `times` times in a row (a burst well within the quiet
/// time, even on a busy machine: no sleep, no process started).
fn burst(path: &Path, times: usize) {
    for i in 0..times {
        std::fs::write(path, format!("version {i}\n")).unwrap();
    }
}

#[test]
fn watch_reloads_once_per_burst_of_changes_and_ignores_noise() {
    let dir = scratch("watch");
    let app: PathBuf = dir.join("app");
    std::fs::create_dir_all(app.join(".git")).unwrap();
    std::fs::create_dir_all(app.join("lib")).unwrap();
    let watched = app.to_str().unwrap();
    let lb = Lb::start(&["--workers", "2", "--watch", watched], &[], 2);
    lb.wait_log("watching ", 1);

    // What tools and logs write is no reason to reload.
    burst(&app.join("server.log"), 3);
    burst(&app.join(".git/index"), 3);
    burst(&app.join("lib/x.pyc"), 3);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(lb.log.count("reloading 2 workers"), 0, "a reload for noise");

    // Twenty writes, and a touch of another file (its mtime only, as
    // `touch` does): one reload.
    std::fs::write(app.join("config.toml"), "").unwrap();
    lb.wait_log("reloaded 2 workers to generation 2", 1);
    let before = pids(&lb, 2);
    burst(&app.join("lib/server.py"), 20);
    std::fs::File::options()
        .write(true)
        .open(app.join("config.toml"))
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .unwrap();
    lb.wait_log("reloaded 2 workers to generation 3", 1);
    let after = pids(&lb, 2);
    for (old, new) in before.iter().zip(&after) {
        assert_ne!(old, new, "not replaced: {before:?} → {after:?}");
    }
    // Nothing more comes of the burst.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lb.log.count("reloading 2 workers"), 2, "more reloads");
    assert_eq!(lb.log.count("lb: watch: "), 2);
}

#[test]
fn completions_source_in_bash_and_the_manual_renders() {
    let run = |args: &[&str]| {
        let out = Command::new(lb_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "lb {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let dir = scratch("manual");
    let script = dir.join("lb.bash");
    std::fs::write(&script, run(&["completions", "bash"])).unwrap();
    // Sourced in a fresh bash: it defines the completion and offers the
    // subcommands.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; source {}; complete -p lb; COMP_WORDS=(lb rel); COMP_CWORD=1; \
             _lb lb rel lb; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-F _lb lb"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("reload"), "{stdout}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(run(&["completions", shell]).contains("status"), "{shell}");
    }
    assert!(
        !Command::new(lb_bin())
            .args(["completions", "tcsh"])
            .status()
            .unwrap()
            .success()
    );

    let page = run(&["man"]);
    assert!(page.starts_with(".TH lb 1"), "{}", &page[..60]);
    for sub in [
        "status",
        "reload",
        "scale",
        "stop",
        "send",
        "completions",
        "man",
    ] {
        assert!(page.contains(&format!(".SS \"lb {sub}\"")), "{sub}");
    }
    let file = dir.join("lb.1");
    std::fs::write(&file, &page).unwrap();
    if !installed("groff", "the manual's rendering is not checked") {
        return;
    }
    // groff with every warning on: the page renders, and says nothing bad.
    let out = Command::new("groff")
        .args(["-man", "-Tascii", "-ww", "-P-cbou"])
        .arg(&file)
        .output()
        .unwrap();
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && warnings.trim().is_empty(),
        "{warnings}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "SIGNALS", "EXAMPLES",
    ] {
        assert!(text.contains(heading), "{heading}");
    }
}

/// A Node pool run as another user: its workers load lb's close-report
/// preload (written readable for them) and get PM2's NODE_APP_INSTANCE.
#[test]
fn node_workers_as_another_user_get_the_preload_and_their_instance() {
    if !is_root() || !installed("node", "Node workers as nobody") {
        eprintln!("skipped: needs root and node");
        return;
    }
    // The node on PATH must be one nobody can run (not one under /root).
    let runs = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "node",
            "--version",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!("skipped: nobody cannot run the node on PATH");
        return;
    }
    let app = scratch("run-as-node");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(repo().join("examples/hello.js"), app.join("hello.js")).unwrap();
    let dir = app.to_str().unwrap();
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--policy",
            "lc",
            "--user",
            "nobody",
            "--cwd",
            dir,
            "--",
            "node",
            "hello.js",
        ],
        &[],
        2,
    );
    let mut instances = Vec::new();
    for slot in 0..2 {
        let pid = lb.pid_of_slot(slot);
        assert_eq!(proc_status(pid, "Uid"), ["65534"; 4]);
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert!(
            vars.iter()
                .any(|v| v.starts_with("NODE_OPTIONS=") && v.contains("--require"))
        );
        instances.extend(
            vars.into_iter()
                .filter(|v| v.starts_with("NODE_APP_INSTANCE=")),
        );
    }
    instances.sort();
    assert_eq!(instances, ["NODE_APP_INSTANCE=0", "NODE_APP_INSTANCE=1"]);
    // Close reports arrive (the preload runs): least-conn sees 0 active.
    for _ in 0..4 {
        get(lb.addr, "/");
    }
    lb.wait_all_closed();
}
