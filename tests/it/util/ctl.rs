//! `lb`'s control commands against a running master's private socket.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{Lb, WAIT, lb_bin};

impl Lb {
    /// Runs `lb <args> --control <its socket>`; stdout then stderr.
    /// Where `--metrics` listens, from the line that says so.
    pub fn metrics_addr(&self) -> String {
        let line = self.wait_log("metrics on http://", 1);
        line.iter()
            .find_map(|l| l.split("http://").nth(1))
            .and_then(|r| r.strip_suffix("/metrics"))
            .unwrap()
            .to_string()
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        let control = self.control.as_deref().expect("started by Lb::start");
        let out = Command::new(lb_bin())
            .args(args)
            .args(["--control", control])
            .output()
            .expect("run lb");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `lb reload` (it returns once every slot has switched); checks that
    /// `workers` were reloaded to `generation`.
    pub fn reload(&self, workers: usize, generation: u64) {
        let out = self.ctl(&["reload"]);
        assert!(
            out.contains(&format!(
                "reloaded {workers} workers to generation {generation}"
            )),
            "{out}"
        );
    }

    /// `lb status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status: {e}: {out}"))
    }

    /// Per slot: (total, active) connections from the status.
    pub fn totals(&self) -> Vec<(u64, u64)> {
        let mut w: Vec<(u64, u64, u64)> = self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["slot"].as_u64().unwrap(),
                    w["total"].as_u64().unwrap(),
                    w["active"].as_u64().unwrap(),
                )
            })
            .collect();
        w.sort();
        w.into_iter().map(|(_, t, a)| (t, a)).collect()
    }

    /// Waits (bounded) until every worker's connections are reported closed.
    pub fn wait_all_closed(&self) -> Vec<(u64, u64)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.totals();
            if t.iter().all(|&(_, active)| active == 0) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "closes never all reported: {t:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
