//! Rolling reloads: a new configuration, and each slot switched to a worker
//! of the new generation once that one is ready.

use super::{Answer, Phase, Supervisor};
use crate::config::Config;
use crate::info;
use crate::policy::Slot;

/// A rolling reload in progress:
/// 1. the new configuration is loaded and the generation bumped;
/// 2. for each slot in turn, a worker of the new generation is started;
/// 3. its READY switches the slot to it and drains the old worker;
/// 4. a candidate that exits or times out before READY aborts the reload:
///    old workers keep serving, the previous configuration is restored for
///    restarts.
pub(super) struct Reload {
    pub(super) queue: std::collections::VecDeque<Slot>,
    /// New workers started and not yet ready (at most `reload_parallel`).
    pub(super) candidates: Vec<u32>,
    pub(super) replaced: usize,
    pub(super) previous: Config,
    pub(super) previous_generation: u64,
    pub(super) reply: Option<crossbeam_channel::Sender<Answer>>,
}

/// Why `new` cannot replace `running` by a rolling reload, if it cannot.
fn unreloadable(new: &Config, running: &Config) -> Option<String> {
    if new.slots() != running.slots() {
        return Some(format!(
            "the new configuration has {} workers, the running one {}; change the count with a \
             restart for now",
            new.slots(),
            running.slots()
        ));
    }
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
    None
}

/// `new` with what only a restart changes (the listen address, the
/// policy, the control socket) as `running` has it; and whether the
/// listen address or the policy asked to change.
fn keep_fixed(mut new: Config, running: &Config) -> (Config, bool) {
    let asked = new.listen != running.listen || new.policy != running.policy;
    new.listen = running.listen;
    new.policy = running.policy;
    new.control = running.control.clone();
    (new, asked)
}

impl Supervisor {
    /// Starts a rolling reload, or answers why not.
    pub(super) fn begin_reload(&mut self, reply: Option<crossbeam_channel::Sender<Answer>>) {
        let refuse = |reply: Option<crossbeam_channel::Sender<Answer>>, why: String| {
            info!("reload refused: {why}");
            if let Some(r) = reply {
                let _ = r.send(Answer::Refused(why));
            }
        };
        if self.phase != Phase::Running {
            return refuse(reply, "the master is stopping".into());
        }
        if self.reload.is_some() {
            return refuse(reply, "a reload is already in progress".into());
        }
        let new = match (self.reconfigure)() {
            Ok(c) => c,
            Err(e) => {
                return refuse(
                    reply,
                    format!("the configuration is invalid, nothing changed: {e}"),
                );
            }
        };
        if let Some(why) = unreloadable(&new, &self.config) {
            return refuse(reply, why);
        }
        let (new, asked) = keep_fixed(new, &self.config);
        if asked {
            info!("reload: the listen address and policy stay as they are until a restart");
        }
        let previous = std::mem::replace(&mut self.config, new);
        self.rss_warned = false;
        self.slot_pools = self.config.slot_pools();
        let previous_generation = self.generation;
        self.generation += 1;
        info!(
            "reloading {} workers to generation {}, {} at a time",
            self.slots.len(),
            self.generation,
            self.config.reload_parallel.max(1)
        );
        crate::systemd::notify(&crate::systemd::reloading());
        self.reload = Some(Reload {
            queue: (0..self.slots.len()).map(Slot).collect(),
            candidates: Vec::new(),
            replaced: 0,
            previous,
            previous_generation,
            reply,
        });
        self.advance_reload();
    }

    /// Starts new workers up to `reload_parallel` at once, or finishes the
    /// reload when every slot has switched.
    pub(super) fn advance_reload(&mut self) {
        let parallel = self.config.reload_parallel.max(1);
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return;
            };
            if reload.candidates.len() >= parallel {
                return;
            }
            let Some(slot) = reload.queue.pop_front() else {
                if !reload.candidates.is_empty() {
                    return; // the last ones are still starting
                }
                let reload = self.reload.take().expect("checked above");
                let msg = format!(
                    "reloaded {} workers to generation {}",
                    reload.replaced, self.generation
                );
                info!("{msg}");
                crate::systemd::notify("READY=1");
                if let Some(r) = reload.reply {
                    let _ = r.send(Answer::Done(msg));
                }
                return;
            };
            // A slot waiting to restart gets the new generation directly.
            self.slots[slot.0].restart_at = None;
            match self.start(slot) {
                Ok(pid) => {
                    if let Some(r) = self.reload.as_mut() {
                        r.candidates.push(pid);
                    }
                }
                Err(e) => return self.abort_reload(e.to_string()),
            }
        }
    }

    /// Ends a failed reload: what already switched stays; the rest keeps its
    /// old workers, and restarts use the previous configuration again.
    pub(super) fn abort_reload(&mut self, why: String) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        self.config = reload.previous;
        self.slot_pools = self.config.slot_pools();
        self.generation = reload.previous_generation;
        let msg = format!(
            "reload failed: {why}; {} workers were replaced, the others keep running",
            reload.replaced
        );
        info!("{msg}");
        if self.phase == Phase::Running {
            crate::systemd::notify("READY=1");
        }
        if let Some(r) = reload.reply {
            let _ = r.send(Answer::Refused(msg));
        }
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
    fn a_reload_keeps_the_count_and_who_accepts() {
        let running = config(&["-w", "2", "--", "sh"]);
        assert_eq!(
            unreloadable(&config(&["-w", "2", "--", "cat"]), &running),
            None
        );
        assert_eq!(
            unreloadable(&config(&["-w", "3", "--", "sh"]), &running).as_deref(),
            Some(
                "the new configuration has 3 workers, the running one 2; change the count with a \
                 restart for now"
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
        assert!(!asked);
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
        assert!(asked);
        assert_eq!(
            (kept.listen, kept.policy, kept.control),
            (running.listen, running.policy, running.control.clone())
        );
        let policy_only = config(&["-l", "127.0.0.1:8100", "-p", "lc"]);
        assert!(keep_fixed(policy_only, &running).1);
    }
}
