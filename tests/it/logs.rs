//! The master's log: timestamps and levels, JSON lines, a master log file,
//! worker logs by a path pattern, and SIGUSR1 reopening them all under a
//! real logrotate.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// A worker that says one line on each stream, then serves.
fn talker(dir: &Path) -> String {
    python_worker(
        dir,
        "talk.py",
        "print('hello on stdout', flush=True)\nprint('oops on stderr', file=sys.stderr, \
         flush=True)\nsend(16)\nserve_forever()",
    )
}

fn two_pools(dir: &Path, script: &str, extra: &str) -> String {
    write_config(
        dir,
        "lb.toml",
        &format!(
            "{extra}{}{}",
            python_pool("web", script, 1),
            python_pool("canary", script, 1)
        ),
    )
}

#[test]
fn json_lines_are_objects_with_the_workers_slot_pid_and_pool() {
    let dir = scratch("logs-json");
    let config = two_pools(&dir, &talker(&dir), "");
    let lb = Lb::start(&["--config", &config, "--log-format", "json"], &[], 2);
    // Each worker's two lines reach the log on their own pipes, in either
    // order: wait for both streams of both workers before counting.
    for slot in 0..2 {
        let pid = lb.pid_of_slot(slot);
        lb.wait_log(&format!("[worker {slot} pid {pid}] hello on stdout"), 1);
        lb.wait_log(
            &format!("[worker {slot} pid {pid} stderr] oops on stderr"),
            1,
        );
    }
    let raw = lb.log.raw_lines();
    let (mut about, mut output) = (0, 0);
    for line in &raw {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(
            humantime::parse_rfc3339(o["time"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        assert!(["info", "warn", "error"].contains(&o["level"].as_str().unwrap()));
        let pool = |slot: u64| if slot == 0 { "web" } else { "canary" };
        if let Some(text) = o.get("line") {
            output += 1;
            let slot = o["slot"].as_u64().unwrap();
            assert_eq!(o["pool"], pool(slot), "{line}");
            assert!(o["pid"].as_u64().unwrap() > 0, "{line}");
            let want = if o["stream"] == "stdout" {
                "hello on stdout"
            } else {
                assert_eq!(o["stream"], "stderr", "{line}");
                "oops on stderr"
            };
            assert_eq!(text, want, "{line}");
        } else {
            let msg = o["msg"]
                .as_str()
                .unwrap_or_else(|| panic!("no msg: {line}"));
            if msg.starts_with("worker ") && msg.contains(" pid ") {
                about += 1;
                let slot = o["slot"].as_u64().unwrap();
                assert_eq!(o["pool"], pool(slot), "{line}");
                assert!(msg.contains(&format!("pid {}", o["pid"])), "{line}");
            }
        }
    }
    assert!(about >= 4, "online and ready for each: {raw:#?}");
    assert_eq!(output, 4, "{raw:#?}");
}

#[test]
fn lines_start_with_a_timestamp_and_level_unless_turned_off() {
    let dir = scratch("logs-stamps");
    let talk = talker(&dir);
    let lb = Lb::start(&["--workers", "1", "--", "python3", &talk], &[], 1);
    lb.wait_log("hello on stdout", 1);
    for line in lb.log.raw_lines() {
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{line}");
        assert!(
            rest.starts_with("INFO  ") || rest.starts_with("WARN  "),
            "{line}"
        );
        if rest.contains("[worker 0 pid") || rest.contains("lb: worker 0 pid") {
            assert!(rest.contains(" pool=main "), "{line}");
        }
    }
    drop(lb);

    let env = [("LB_LOG_TIMESTAMPS", "off")];
    let lb = Lb::start(&["--workers", "1", "--", "python3", &talk], &env, 1);
    lb.wait_log("hello on stdout", 1);
    for line in lb.log.raw_lines() {
        assert!(
            line.starts_with("INFO  lb: ") || line.starts_with("INFO  pool=main "),
            "{line}"
        );
    }
}

/// Waits (bounded) until `path` holds `needle`.
fn wait_file(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The numbers slot `slot` counted in `text` (a worker log's lines).
fn counted(text: &str, slot: usize) -> Vec<u64> {
    let head = format!("[worker {slot} pid ");
    text.lines()
        .map(text_of)
        .filter_map(|l| {
            let rest = l.strip_prefix(&head)?;
            rest.split_once("] ")?.1.parse().ok()
        })
        .collect()
}

#[test]
fn logrotate_then_usr1_moves_every_log_to_a_new_file_and_loses_no_line() {
    if !installed("logrotate", "the logrotate test") {
        return;
    }
    let dir = scratch("logs-rotate");
    let counter = python_worker(
        &dir,
        "count.py",
        "import threading\ndef count():\n    i = 0\n    while True:\n        print(i, flush=True)\n        \
         i += 1\n        time.sleep(0.002)\nsend(16)\nthreading.Thread(target=count, daemon=True).start()\n\
         serve_forever()",
    );
    let logs = dir.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let master = logs.join("lb.log");
    let pattern = logs.join("{pool}-{stream}.log");
    let config = two_pools(&dir, &counter, "");
    let control = dir.join("lb.sock");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
        "--config",
        &config,
        "--log-file",
        master.to_str().unwrap(),
        "--worker-log",
        pattern.to_str().unwrap(),
    ];
    let mut cmd = lb_command(&args, &[]);
    let child = cmd.spawn().unwrap();
    let lb = Lb {
        child: Some(child),
        addr: "127.0.0.1:1".parse().unwrap(),
        log: Log::default(),
        control: None,
    };
    let text = wait_file(&master, "gen 1: ready");
    wait_file(&master, "worker 1 pid");
    assert!(text.lines().all(|l| !l.starts_with("lb:")), "{text}");
    let web = logs.join("web-stdout.log");
    wait_file(&web, "] 100\n");
    assert!(
        std::fs::read_to_string(logs.join("canary-stdout.log"))
            .unwrap()
            .contains("[worker 1 pid")
    );
    assert!(logs.join("web-stderr.log").exists());

    let conf = dir.join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{}/*.log {{\n    rotate 3\n    create\n    missingok\n    sharedscripts\n    \
             postrotate\n        kill -USR1 {}\n    endscript\n}}\n",
            logs.display(),
            lb.pid()
        ),
    )
    .unwrap();
    let out = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = logs.join("web-stdout.log.1");
    assert!(rotated.exists());
    let said = wait_file(&master, "SIGUSR1: reopened ");
    assert!(
        said.contains(&format!("SIGUSR1: reopened {}", master.display())),
        "{said}"
    );
    wait_file(
        &master,
        &format!(
            "SIGUSR1: reopened {}",
            logs.join("canary-stderr.log").display()
        ),
    );
    // The new file fills up.
    let deadline = Instant::now() + WAIT;
    while counted(&std::fs::read_to_string(&web).unwrap(), 0).len() < 100 {
        assert!(
            Instant::now() < deadline,
            "nothing in the new {}",
            web.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(lb);

    let old = counted(&std::fs::read_to_string(&rotated).unwrap(), 0);
    let new = counted(&std::fs::read_to_string(&web).unwrap(), 0);
    assert!(
        old.len() >= 100 && new.len() >= 100,
        "{} + {}",
        old.len(),
        new.len()
    );
    assert_eq!(old[0], 0);
    let all: Vec<u64> = old.iter().chain(&new).copied().collect();
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "every line once, in order, old file then new"
    );
    assert!(
        std::fs::read_to_string(logs.join("lb.log.1"))
            .unwrap()
            .contains("listening on")
    );
}
