//! Rolling reloads: a new configuration, counts included (slots added and
//! removed, see `layout`), and each slot switched to a worker of the new
//! generation once that one is ready (`rolling`).

use super::layout;
use super::rolling::{Previous, Reload, Rolling};
use super::{Answer, SlotState, Supervisor};
use crate::config::defaults::MAX_WORKERS;
use crate::config::{Config, Pool};
use crate::policy::Slot;
use crate::{info, warn};

/// Why `new` cannot replace `running` by a rolling reload, if it cannot.
fn unreloadable(new: &Config, running: &Config) -> Option<String> {
    // What the dispatcher was built for at start: whether it accepts at
    // all (not in shared mode) and whether it has proxy relays.
    let shape = |c: &Config| (c.shared(), c.relays());
    if shape(new) != shape(running) {
        return Some(
            "the new configuration adds or removes shared or proxy mode, which lb sets up at \
             start (who accepts, the relays); restart lb for that"
                .into(),
        );
    }
    if new.slots() > MAX_WORKERS {
        return Some(format!(
            "the new configuration runs {} workers (with the counts `lb scale` set), more than \
             the {MAX_WORKERS} one master runs; lower a count",
            new.slots()
        ));
    }
    None
}

/// Why `remap` needs more slots than a master runs, if it does: slots
/// given up serve until the reload ends, so new ones go past them.
fn too_many_slots(remap: &layout::Remap) -> Option<String> {
    (remap.layout.len() > MAX_WORKERS).then(|| {
        format!(
            "the new pools would need slots up to {} while the {} slots given up still serve, \
             more than the {MAX_WORKERS} one master runs; reload in two steps: first remove or \
             shrink, then add or grow",
            remap.layout.len() - 1,
            remap.removed.len()
        )
    })
}

/// `new` with what only a restart changes as `running` has it (what lb
/// set up once at start: its sockets, the dispatcher, the log, the
/// watcher); and the settings `new` asked to change among them.
fn keep_fixed(mut new: Config, running: &Config) -> (Config, Vec<&'static str>) {
    let mut asked = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if new.$field != running.$field {
                asked.push(stringify!($field));
                new.$field = running.$field.clone();
            }
        )*};
    }
    // (The control socket too, silently: a reload's own answer goes there.)
    new.control = running.control.clone();
    keep!(
        listeners,
        policy,
        dispatch,
        proxy_header_timeout,
        metrics,
        stall_timeout,
        max_conns,
        proxy_connect_timeout,
        proxy_idle_timeout,
        log_format,
        log_timestamps,
        log_file,
        worker_log,
        watch
    );
    (new, asked)
}

/// Keeps in `new` the counts `lb scale` set in `running` for the pools
/// whose configured count did not change since `configured` (the count
/// the configuration gave at the last load): a reload deploys, it does not
/// undo a scale. What it kept, one phrase each.
fn keep_scaled(new: &mut [Pool], running: &[Pool], configured: &[(String, usize)]) -> Vec<String> {
    let mut kept = Vec::new();
    for p in new.iter_mut() {
        let was = configured.iter().find(|(n, _)| *n == p.name).map(|c| c.1);
        let now = running.iter().find(|r| r.name == p.name).map(|r| r.count);
        if let (Some(was), Some(now)) = (was, now)
            && was == p.count
            && now != p.count
        {
            kept.push(format!(
                "pool `{}` keeps the {now} workers `lb scale` set (its configured count, {was}, \
                 did not change)",
                p.name
            ));
            p.count = now;
        }
    }
    kept
}

/// What changes in the pools' counts, e.g. "web 2 → 3 workers, canary
/// removed, batch added (1 worker)"; empty when nothing does.
fn count_changes(old: &[Pool], new: &[Pool]) -> String {
    let mut out = Vec::new();
    for p in new {
        match old.iter().find(|o| o.name == p.name) {
            Some(o) if o.count != p.count => {
                out.push(format!("{} {} → {} workers", p.name, o.count, p.count))
            }
            Some(_) => {}
            None => out.push(format!(
                "{} added ({} worker{})",
                p.name,
                p.count,
                if p.count == 1 { "" } else { "s" }
            )),
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|p| p.name == o.name)) {
        out.push(format!("{} removed", o.name));
    }
    out.join(", ")
}

impl Supervisor {
    /// Starts a rolling reload, or answers why not.
    pub(super) fn begin_reload(&mut self, reply: Option<crossbeam_channel::Sender<Answer>>) {
        if let Some(why) = self.busy(Rolling::Reload) {
            return self.refuse(Rolling::Reload, reply, why);
        }
        let new = match (self.reconfigure)() {
            Ok(c) => c,
            Err(e) => {
                let why = format!("the configuration is invalid, nothing changed: {e}");
                return self.refuse(Rolling::Reload, reply, why);
            }
        };
        let (mut new, asked) = keep_fixed(new, &self.config);
        let configured = layout::configured(&new.pools);
        let kept = keep_scaled(&mut new.pools, &self.config.pools, &self.configured);
        if let Some(why) = unreloadable(&new, &self.config) {
            return self.refuse(Rolling::Reload, reply, why);
        }
        if !asked.is_empty() {
            warn!(
                "reload: {} stay as they are until a restart (lb sets them up once, at start)",
                asked.join(", ")
            );
        }
        for k in &kept {
            info!("reload: {k}");
        }
        let changes = count_changes(&self.config.pools, &new.pools);
        let remap = self.layout.remap(&self.config.pools, &new.pools);
        if let Some(why) = too_many_slots(&remap) {
            return self.refuse(Rolling::Reload, reply, why);
        }
        let previous = Previous {
            config: std::mem::replace(&mut self.config, new),
            generation: self.generation,
            layout: std::mem::replace(&mut self.layout, remap.layout),
            configured: std::mem::replace(&mut self.configured, configured),
        };
        self.rss_warned = false;
        self.generation += 1;
        if self.slots.len() < self.layout.len() {
            self.slots
                .resize_with(self.layout.len(), SlotState::default);
        }
        for s in &remap.added {
            self.slots[s.0] = SlotState::default();
        }
        // Their workers serve until the reload is done, and never restart.
        for s in &remap.removed {
            self.slots[s.0].restart_at = None;
        }
        let queue: std::collections::VecDeque<Slot> = remap
            .added
            .iter()
            .copied()
            .chain(
                self.layout
                    .taken()
                    .into_iter()
                    .filter(|s| !remap.added.contains(s)),
            )
            .collect();
        let detail = if changes.is_empty() {
            String::new()
        } else {
            format!(" ({changes})")
        };
        info!(
            "reloading {} workers to generation {}, {} at a time{detail}",
            queue.len(),
            self.generation,
            self.config.reload_parallel.max(1)
        );
        crate::systemd::notify(&crate::systemd::reloading());
        self.reload = Some(Reload {
            what: Rolling::Reload,
            queue,
            candidates: Vec::new(),
            replaced: 0,
            parallel: self.config.reload_parallel.max(1),
            previous: Some(previous),
            added: remap.added,
            removed: remap.removed,
            detail,
            wait: None,
            reply,
        });
        self.advance_reload();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        let args =
            crate::cli::Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
                .unwrap()
                .start;
        let path = std::env::var("PATH").ok();
        crate::config::load(&args, &|k| (k == "PATH").then(|| path.clone()).flatten()).unwrap()
    }

    #[test]
    fn a_reload_keeps_who_accepts() {
        let running = config(&["-w", "2", "--", "sh"]);
        assert_eq!(
            unreloadable(&config(&["-w", "2", "--", "cat"]), &running),
            None
        );
        // A count changes by a reload now.
        assert_eq!(
            unreloadable(&config(&["-w", "3", "--", "sh"]), &running),
            None
        );
        let mut big = config(&["-w", "3", "--", "sh"]);
        big.pools[0].count = MAX_WORKERS + 1;
        assert_eq!(
            unreloadable(&big, &running).as_deref(),
            Some(
                "the new configuration runs 1025 workers (with the counts `lb scale` set), more \
                 than the 1024 one master runs; lower a count"
            )
        );
        let mode = "the new configuration adds or removes shared or proxy mode, which lb sets up \
                    at start (who accepts, the relays); restart lb for that";
        for other in ["shared", "proxy"] {
            let new = config(&["-w", "2", "-m", other, "--", "sh"]);
            assert_eq!(
                unreloadable(&new, &running).as_deref(),
                Some(mode),
                "{other}"
            );
            assert_eq!(
                unreloadable(&running, &new).as_deref(),
                Some(mode),
                "{other}"
            );
        }
        // Between modes lb hands connections to, a reload may switch.
        let shim = config(&["-w", "2", "-m", "shim", "--", "sh"]);
        assert_eq!(unreloadable(&shim, &running), None);
    }

    #[test]
    fn the_listen_address_policy_and_control_socket_wait_for_a_restart() {
        let running = config(&[
            "-l",
            "127.0.0.1:8100",
            "-p",
            "rr",
            "--control",
            "/tmp/a.sock",
        ]);
        let same = config(&["-l", "127.0.0.1:8100", "-p", "rr", "-w", "5"]);
        let (kept, asked) = keep_fixed(same, &running);
        assert!(asked.is_empty(), "{asked:?}");
        assert_eq!(kept.control, running.control);
        assert_eq!(kept.slots(), 5);
        let moved = config(&[
            "-l",
            "127.0.0.1:8200",
            "-p",
            "lc",
            "--control",
            "/tmp/b.sock",
        ]);
        let (kept, asked) = keep_fixed(moved, &running);
        assert_eq!(asked, ["listeners", "policy"]);
        assert_eq!(
            (kept.listeners, kept.policy, kept.control),
            (
                running.listeners.clone(),
                running.policy,
                running.control.clone()
            )
        );
        let policy_only = config(&["-l", "127.0.0.1:8100", "-p", "lc"]);
        assert_eq!(keep_fixed(policy_only, &running).1, ["policy"]);
        let logged = config(&[
            "-l",
            "127.0.0.1:8100",
            "--control",
            "/tmp/a.sock",
            "--log-format",
            "json",
            "--dispatch",
            "auto",
        ]);
        let (kept, asked) = keep_fixed(logged, &running);
        assert_eq!(asked, ["dispatch", "log_format"]);
        assert_eq!(kept.log_format, running.log_format);
    }

    #[test]
    fn a_reload_keeps_a_scale_unless_the_configured_count_changed() {
        use crate::supervisor::layout::tests::pools;
        // Configured web 2, canary 1; `lb scale` made web 5.
        let configured = layout::configured(&pools(&[("web", 2), ("canary", 1)]));
        let running = pools(&[("web", 5), ("canary", 1)]);
        let mut same = pools(&[("web", 2), ("canary", 1)]);
        let kept = keep_scaled(&mut same, &running, &configured);
        assert_eq!((same[0].count, same[1].count), (5, 1));
        assert_eq!(
            kept,
            [
                "pool `web` keeps the 5 workers `lb scale` set (its configured count, 2, did not \
              change)"
            ]
        );
        let mut changed = pools(&[("web", 3), ("canary", 2), ("batch", 1)]);
        assert!(keep_scaled(&mut changed, &running, &configured).is_empty());
        assert_eq!(
            count_changes(&running, &changed),
            "web 5 → 3 workers, canary 1 → 2 workers, batch added (1 worker)"
        );
        assert_eq!(
            count_changes(&running, &pools(&[("web", 5)])),
            "canary removed"
        );
        assert_eq!(count_changes(&running, &running), "");
    }

    #[test]
    fn a_reload_may_not_push_slots_past_the_limit() {
        use crate::supervisor::layout::tests::pools;
        let old = pools(&[("a", 1000), ("b", 24)]);
        let layout = layout::Layout::new(&old);
        assert_eq!(
            too_many_slots(&layout.remap(&old, &pools(&[("a", 1000), ("b", 20)]))),
            None
        );
        let swap = layout.remap(&old, &pools(&[("c", 1000), ("b", 24)]));
        assert_eq!(
            too_many_slots(&swap).as_deref(),
            Some(
                "the new pools would need slots up to 2023 while the 1000 slots given up still \
                 serve, more than the 1024 one master runs; reload in two steps: first remove \
                 or shrink, then add or grow"
            )
        );
    }
}
