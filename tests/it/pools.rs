//! Pools operated at run time: `lb scale POOL`, reloads that change the
//! counts, `lb restart SLOT|POOL|all`, each under load with no failed
//! request and running workers keeping their slots; and every refusal.

use std::collections::{BTreeMap, HashSet};
use std::process::Command;

use crate::util::load::{Load, Style, Tally};
use crate::util::*;

/// `lb <args> --control <lb's socket>`: (exit code, stdout, stderr).
fn run(lb: &Lb, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(lb_bin())
        .args(args)
        .args(["--control", lb.control.as_deref().unwrap()])
        .env_remove("LB_CONTROL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `run`, which must succeed; its stdout.
fn ok(lb: &Lb, args: &[&str]) -> String {
    let (code, out, err) = run(lb, args);
    assert_eq!(code, Some(0), "lb {args:?}: {out}{err}");
    out
}

/// `run`, which must be refused (exit 1) with exactly `why`.
fn refused(lb: &Lb, args: &[&str], why: &str) {
    let (code, out, err) = run(lb, args);
    assert_eq!(code, Some(1), "lb {args:?}: {out}{err}");
    assert_eq!(err.trim_end(), format!("lb: error: {why}"), "lb {args:?}");
}

/// Slot → pid of every worker that status shows, draining ones left out.
fn serving(lb: &Lb) -> BTreeMap<u64, u64> {
    lb.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] != "draining")
        .map(|w| (w["slot"].as_u64().unwrap(), w["pid"].as_u64().unwrap_or(0)))
        .collect()
}

/// Slot → pool name of every worker that status shows.
fn pools_of(lb: &Lb) -> BTreeMap<u64, String> {
    lb.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let pool = w["pool"].as_str().unwrap().to_string();
            (w["slot"].as_u64().unwrap(), pool)
        })
        .collect()
}

/// Waits (bounded) until status shows exactly `slots`, each ready.
fn wait_slots(lb: &Lb, slots: &[u64]) -> BTreeMap<u64, u64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = lb.status();
        let workers = status["workers"].as_array().unwrap();
        let shown: Vec<u64> = workers
            .iter()
            .map(|w| w["slot"].as_u64().unwrap())
            .collect();
        if shown == slots && workers.iter().all(|w| w["state"] == "ready") {
            return serving(lb);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never just slots {slots:?}: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Three pools with the middle one to grow and shrink: api (slot 0), web
/// (1-2), canary (3). api's workers take 0.5 s to get ready, so that a
/// restart of it is in progress long enough to be seen.
fn three_pools(dir: &std::path::Path, web: usize, canary: bool) -> String {
    let slow = format!(
        "[[pool]]\nname = \"api\"\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 0.5; exec {} \
         hello-worker\"]\ncount = 1\n",
        lb_bin()
    );
    let canary = if canary {
        hello_pool("canary", 1)
    } else {
        hello_pool("batch", 1)
    };
    write_config(
        dir,
        "lb.toml",
        &format!("{slow}{}{canary}", hello_pool("web", web)),
    )
}

fn assert_no_failure(what: &str, tally: Tally) {
    eprintln!("{what}: {tally:?}");
    assert_eq!(tally.failed, 0, "{what}: {:?}", tally.first);
    assert!(tally.ok > 200, "{what}: the load kept flowing: {tally:?}");
}

/// Keep-alive and one-request-per-connection clients at once.
fn load(lb: &Lb) -> (Load, Load) {
    let loads = (
        Load::start(lb.addr, 4, Style::KeepAlive, None),
        Load::start(lb.addr, 2, Style::Close, None),
    );
    loads.0.wait_more(100);
    loads
}

fn stop((a, b): (Load, Load), what: &str) {
    assert_no_failure(&format!("{what} (keep-alive)"), a.stop());
    assert_no_failure(&format!("{what} (close)"), b.stop());
}

#[test]
fn a_middle_pool_scales_up_and_down_under_load_and_no_one_moves() {
    let dir = scratch("pools-scale");
    let config = three_pools(&dir, 2, true);
    let lb = Lb::start(&["--config", &config], &[], 4);
    let before = wait_slots(&lb, &[0, 1, 2, 3]);
    let loads = load(&lb);

    let out = ok(&lb, &["scale", "web", "+1"]);
    assert_eq!(
        out.trim(),
        "scaled pool `web` from 2 to 3 workers (1 starting)"
    );
    // The new worker gets the next slot; canary keeps 3, the others theirs.
    let grown = wait_slots(&lb, &[0, 1, 2, 3, 4]);
    for slot in 0..4 {
        assert_eq!(grown[&slot], before[&slot], "slot {slot} kept its worker");
    }
    // It serves, and knows its slot (LB_WORKER_ID).
    let seen: HashSet<usize> = (0..60).map(|_| slot_of(&get(lb.addr, "/"))).collect();
    assert!(seen.contains(&4), "{seen:?}");
    let names = ["api", "web", "web", "canary", "web"];
    let expected: BTreeMap<u64, String> = (0..5).map(|s| (s, names[s as usize].into())).collect();
    assert_eq!(pools_of(&lb), expected);
    loads.0.wait_more(200);

    let out = ok(&lb, &["scale", "web", "-1"]);
    assert_eq!(
        out.trim(),
        "scaled pool `web` from 3 to 2 workers (1 draining)"
    );
    lb.wait_log(&format!("worker 4 pid {} gen 1: exit", grown[&4]), 1);
    assert_eq!(wait_slots(&lb, &[0, 1, 2, 3]), before);
    // web to 1: its highest slot goes, canary stays where it is.
    ok(&lb, &["scale", "web", "1"]);
    lb.wait_log(&format!("worker 2 pid {} gen 1: exit", before[&2]), 1);
    wait_slots(&lb, &[0, 1, 3]);
    // Growing again fills the hole first.
    ok(&lb, &["scale", "web", "2"]);
    let refilled = wait_slots(&lb, &[0, 1, 2, 3]);
    assert_eq!(refilled[&3], before[&3]);
    loads.0.wait_more(200);
    stop(loads, "scaling web");
}

#[test]
fn a_reload_applies_changed_counts_under_load() {
    let dir = scratch("pools-reload");
    let config = three_pools(&dir, 2, true);
    let lb = Lb::start(&["--config", &config], &[], 4);
    let before = wait_slots(&lb, &[0, 1, 2, 3]);
    let loads = load(&lb);

    // web 2 → 3, canary removed, batch added.
    three_pools(&dir, 3, false);
    let out = ok(&lb, &["reload"]);
    assert_eq!(
        out.trim(),
        "reloaded 5 workers to generation 2 (web 2 → 3 workers, batch added (1 worker), canary \
         removed)"
    );
    // canary's slot 3 is not handed to another pool in the same reload:
    // web's new worker takes 4, batch 5; canary drains once all switched.
    lb.wait_log(&format!("worker 3 pid {} gen 1: exit", before[&3]), 1);
    let after = wait_slots(&lb, &[0, 1, 2, 4, 5]);
    for slot in [0, 1, 2] {
        assert_ne!(after[&slot], before[&slot], "slot {slot} was replaced");
    }
    let seen: HashSet<usize> = (0..80).map(|_| slot_of(&get(lb.addr, "/"))).collect();
    assert!(seen.contains(&4) && seen.contains(&5), "{seen:?}");
    let expected: BTreeMap<u64, String> =
        [(0, "api"), (1, "web"), (2, "web"), (4, "web"), (5, "batch")]
            .into_iter()
            .map(|(s, p)| (s, p.to_string()))
            .collect();
    assert_eq!(pools_of(&lb), expected);
    loads.0.wait_more(200);

    // A scale survives a reload whose configured count did not change…
    ok(&lb, &["scale", "web", "+1"]);
    wait_slots(&lb, &[0, 1, 2, 3, 4, 5]);
    let out = ok(&lb, &["reload"]);
    assert_eq!(out.trim(), "reloaded 6 workers to generation 3");
    lb.wait_log(
        "reload: pool `web` keeps the 4 workers `lb scale` set (its configured count, 3, did \
         not change)",
        1,
    );
    // …and a changed count wins: web back to 2, its highest slots drain.
    three_pools(&dir, 2, false);
    let out = ok(&lb, &["reload"]);
    assert_eq!(
        out.trim(),
        "reloaded 4 workers to generation 4 (web 4 → 2 workers)"
    );
    let last = wait_slots(&lb, &[0, 1, 2, 5]);
    assert!(last.values().all(|&pid| pid != 0));
    loads.0.wait_more(200);
    stop(loads, "reloads with changed counts");
}

#[test]
fn a_restart_rolls_one_slot_at_a_time_successor_first_under_load() {
    let dir = scratch("pools-restart");
    let config = three_pools(&dir, 2, true);
    let lb = Lb::start(&["--config", &config], &[], 4);
    let before = wait_slots(&lb, &[0, 1, 2, 3]);
    let loads = load(&lb);

    let out = ok(&lb, &["restart", "web"]);
    assert_eq!(out.trim(), "restarted 2 workers of pool `web` (slots 1-2)");
    let after = serving(&lb);
    assert_eq!(after[&0], before[&0]);
    assert_eq!(after[&3], before[&3]);
    for slot in [1, 2] {
        assert_ne!(after[&slot], before[&slot]);
    }
    // Successor ready before the old one drains; slot 2 only after slot 1.
    let lines = lb.log.lines();
    let at = |needle: String| {
        lines
            .iter()
            .position(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no {needle:?}"))
    };
    let ready = |slot: u64| at(format!("worker {slot} pid {} gen 1: ready", after[&slot]));
    let draining = |slot: u64| {
        at(format!(
            "worker {slot} pid {} gen 1: draining",
            before[&slot]
        ))
    };
    assert!(ready(1) < draining(1) && ready(2) < draining(2));
    assert!(ready(1) < at(format!("worker {} pid {} gen 1: online", 2, after[&2])));
    loads.0.wait_more(200);

    // A slot, with --wait: answered once the old worker has exited.
    let out = ok(&lb, &["restart", "3", "--wait"]);
    assert_eq!(
        out.trim(),
        "restarted worker 3; every replaced worker has drained and exited"
    );
    assert!(!alive(before[&3] as u32));
    let out = ok(&lb, &["restart", "all"]);
    assert_eq!(out.trim(), "restarted all 4 workers");
    loads.0.wait_more(200);
    stop(loads, "restarts");
    let status = lb.status();
    let restarts: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .collect();
    assert_eq!(restarts, [1, 2, 2, 2], "{status}");
}

#[test]
fn every_refusal_says_why_in_one_line() {
    let dir = scratch("pools-refusals");
    let config = three_pools(&dir, 2, true);
    let lb = Lb::start(&["--config", &config], &[], 4);
    wait_slots(&lb, &[0, 1, 2, 3]);
    refused(
        &lb,
        &["scale", "+1"],
        "this master runs 3 pools (api, web, canary); name the one to scale: lb scale POOL \
         N|+N|-N",
    );
    refused(
        &lb,
        &["scale", "www", "+1"],
        "no pool `www`; this master runs api, web, canary",
    );
    refused(
        &lb,
        &["scale", "web", "-2"],
        "pool `web`: 0 workers: give a count from 1 to 1024",
    );
    refused(
        &lb,
        &["scale", "web", "1023"],
        "pool `web` at 1023 workers would make 1025 in all, more than the 1024 one master \
         runs; give a smaller count",
    );
    let (code, _, err) = run(&lb, &["scale", "web"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim_end(),
        "lb: error: invalid count `web`: give N, +N or -N (after the pool's name: lb scale web N)"
    );
    refused(
        &lb,
        &["restart", "www"],
        "no pool or slot `www`; give a slot (0-3), a pool (api, web, canary) or `all`",
    );
    refused(
        &lb,
        &["restart", "7"],
        "no worker runs in slot 7; the slots are 0-3",
    );

    // While api restarts (its workers take 0.5 s to be ready), nothing else
    // rolls or scales.
    let restart = {
        let control = lb.control.clone().unwrap();
        std::thread::spawn(move || {
            Command::new(lb_bin())
                .args(["restart", "api", "--control", &control])
                .output()
                .unwrap()
        })
    };
    lb.wait_log("restarting 1 worker of pool `api`", 1);
    refused(&lb, &["restart", "web"], "a restart is already in progress");
    refused(
        &lb,
        &["reload"],
        "a restart is in progress; reload once it is done",
    );
    refused(
        &lb,
        &["scale", "web", "+1"],
        "a restart is in progress; scale once it is done",
    );
    let out = restart.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    // And while a reload runs, no restart.
    let reload = {
        let control = lb.control.clone().unwrap();
        std::thread::spawn(move || {
            Command::new(lb_bin())
                .args(["reload", "--control", &control])
                .output()
                .unwrap()
        })
    };
    lb.wait_log("reloading 4 workers to generation 2", 1);
    refused(
        &lb,
        &["restart", "api"],
        "a reload is in progress; restart once it is done",
    );
    assert!(reload.join().unwrap().status.success());
}

#[test]
fn a_failed_restart_keeps_the_old_worker() {
    let dir = scratch("pools-restart-fail");
    let script = dir.join("flaky.sh");
    // The first start serves; every later one exits before READY.
    std::fs::write(
        &script,
        format!(
            "if [ -e {0}/started ]; then exit 3; fi\ntouch {0}/started\nexec {1} hello-worker\n",
            dir.display(),
            lb_bin()
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join("started"));
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"web\"\ncommand = \"sh\"\nargs = [\"{}\"]\ncount = 1\n",
            script.display()
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 1);
    let before = wait_slots(&lb, &[0]);
    refused(
        &lb,
        &["restart", "web"],
        "restart failed: worker 0 of generation 1 exited before READY (exit code 3); 0 workers \
         were replaced, the others keep running",
    );
    assert_eq!(serving(&lb), before);
    assert_eq!(pid_of(&get(lb.addr, "/")), before[&0] as u32);
}

#[test]
fn two_pools_of_one_name_are_refused_at_start_and_at_reload() {
    let dir = scratch("pools-dup");
    let text = format!("{}{}", hello_pool("web", 1), hello_pool("web", 1));
    let config = write_config(&dir, "dup.toml", &text);
    let (status, log) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert_eq!(
        log.trim_end(),
        format!(
            "lb: error: [[pool]] 1 and [[pool]] 2 in {config} are both named `web`; give each \
             pool a `name` of its own"
        )
    );
    let config = write_config(&dir, "lb.toml", &hello_pool("web", 1));
    let lb = Lb::start(&["--config", &config], &[], 1);
    write_config(&dir, "lb.toml", &text);
    refused(
        &lb,
        &["reload"],
        &format!(
            "the configuration is invalid, nothing changed: [[pool]] 1 and [[pool]] 2 in \
             {config} are both named `web`; give each pool a `name` of its own"
        ),
    );
}

#[test]
fn a_restart_of_a_worker_still_starting_replaces_it_once_both_are_ready() {
    let dir = scratch("pools-restart-starting");
    let config = three_pools(&dir, 1, true);
    let lb = Lb::start(&["--config", &config], &[], 3);
    // api's new worker (slot 3) takes 0.5 s to be ready; its successor is
    // started meanwhile, and is not drained by the older one's READY.
    ok(&lb, &["scale", "api", "+1"]);
    let control = lb.control.clone().unwrap();
    let mut restart = Command::new(lb_bin())
        .args(["restart", "3", "--control", &control])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = restart.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            send_signal(restart.id(), libc::SIGKILL);
            let _ = restart.wait();
            panic!("the restart never finished");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut restart.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out.trim(), "restarted worker 3");
    let slots = wait_slots(&lb, &[0, 1, 2, 3]);
    assert_eq!(lb.pid_of_slot(3) as u64, slots[&3]);
}

#[test]
fn a_failed_reload_with_new_counts_keeps_the_old_layout() {
    let dir = scratch("pools-reload-fail");
    let two = format!("{}{}", hello_pool("web", 2), hello_pool("canary", 1));
    let config = write_config(&dir, "lb.toml", &two);
    let lb = Lb::start(&["--config", &config, "--ready-timeout", "300ms"], &[], 3);
    let before = wait_slots(&lb, &[0, 1, 2]);
    // web grows by a worker that never says READY; canary goes.
    write_config(
        &dir,
        "lb.toml",
        "[[pool]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"60\"]\ncount = 3\n",
    );
    refused(
        &lb,
        &["reload"],
        "reload failed: worker 3 of generation 2 exited before READY (not ready within 0.3s); \
         0 workers were replaced, the others keep running",
    );
    // Nothing was drained, and canary is still a pool: its slot restarts.
    assert_eq!(wait_slots(&lb, &[0, 1, 2]), before);
    send_signal(before[&2] as u32, libc::SIGKILL);
    lb.wait_log("worker 2: restart #1", 1);
    let after = wait_slots(&lb, &[0, 1, 2]);
    assert_ne!(after[&2], before[&2]);
    // And the old configuration is what a scale now starts.
    write_config(&dir, "lb.toml", &two);
    ok(&lb, &["scale", "web", "+1"]);
    wait_slots(&lb, &[0, 1, 2, 3]);
}
