//! Starting a slot's worker: what its mode needs made first (the Node
//! preload, the shim, a port), the spawn, and telling the dispatcher.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::{
    CHILD_BASE, Proc, SAID_PER_SECOND, Supervisor, SupervisorError, backoff, output, preload, spawn,
};
use crate::config::{DrainBy, Mode};
use crate::dispatch::Command;
use crate::info;
use crate::policy::Slot;

impl Supervisor {
    /// Starts the worker for `slot`; the error is fatal only at start-up.
    pub(super) fn start(&mut self, slot: Slot) -> Result<u32, SupervisorError> {
        let pool = &self.config.pools[self.slot_pools[slot.0]];
        let generation = self.generation;
        info!(
            "worker {slot} gen {generation}: spawn `{}`",
            spawn::describe_command(pool)
        );
        let report_closed = self.config.policy.uses_close_reports();
        if pool.mode == Mode::Node && report_closed && self.node_preload.is_none() {
            self.node_preload = Some(preload::Preload::write().map_err(|source| {
                SupervisorError::Spawn {
                    pool: pool.name.clone(),
                    command: "the Node.js close-report preload".into(),
                    source,
                    hint: "it is written to $XDG_RUNTIME_DIR or the temp directory; check that one is writable",
                }
            })?);
        }
        if pool.mode == Mode::Shim && self.shim.is_none() {
            self.shim =
                Some(
                    crate::shim::Memfd::create().map_err(|source| SupervisorError::Spawn {
                        pool: pool.name.clone(),
                        command: "the accept shim (an in-memory file)".into(),
                        source,
                        hint: "memfd_create failed; check the fd limit",
                    })?,
                );
        }
        self.node_ids += 1;
        let proxy_port = if pool.mode.relays() {
            Some(spawn::free_port().map_err(|source| SupervisorError::Spawn {
                pool: pool.name.clone(),
                command: pool.command.display().to_string(),
                source,
                hint: "no free loopback port for the worker to listen on",
            })?)
        } else {
            None
        };
        let launch = spawn::Launch {
            slot,
            generation,
            report_closed,
            node_id: self.node_ids,
            node_preload: self
                .node_preload
                .as_ref()
                .filter(|_| report_closed)
                .map(|p| p.file.as_path()),
            port: self.port,
            proxy_port,
            shim: self.shim.as_ref(),
            listener: self.shared_listener.as_ref().map(|l| l.as_raw_fd()),
            drain_timeout: self.config.drain_timeout,
            queue: self.config.worker_queue,
        };
        let spawned = spawn::spawn(pool, &launch).map_err(|source| {
            // ENOENT for a file that exists: exec could not find what the file needs.
            let hint = if source.kind() == io::ErrorKind::NotFound && pool.command.exists() {
                "the file exists, so its #! interpreter or its dynamic loader is missing"
            } else {
                "check that it is an executable program"
            };
            SupervisorError::Spawn {
                pool: pool.name.clone(),
                command: pool.command.display().to_string(),
                source,
                hint,
            }
        })?;
        let pid = spawned.child.id();
        if let Some(r) = self.reaper.as_mut() {
            r.add(pid);
        }
        info!("worker {slot} pid {pid} gen {generation}: online");
        self.poll
            .registry()
            .register(
                &mut SourceFd(&spawned.pidfd.as_raw_fd()),
                Token(CHILD_BASE + pid as usize),
                Interest::READABLE,
            )
            .map_err(SupervisorError::Poll)?;
        for (fd, stderr) in [(spawned.stdout, false), (spawned.stderr, true)] {
            self.output.add(output::Pipe {
                slot,
                pid,
                stderr,
                fd,
            });
        }
        self.dispatch.send(Command::Attach {
            slot,
            pid,
            channel: spawned.channel,
            peer: spawned.peer,
            weight: pool.weight,
            mode: pool.mode,
            port: proxy_port.unwrap_or(0),
        });
        self.procs.push(Proc {
            slot,
            pid,
            generation,
            child: spawned.child,
            pidfd: spawned.pidfd,
            started: Instant::now(),
            ready: false,
            retiring: false,
            ready_timed_out: false,
            kill_at: None,
            malformed: 0,
            recycling: false,
            replace_at: None,
            said: crate::log::Budget::new(SAID_PER_SECOND),
            stalled: false,
            rss_checked: false,
            stop_signal: pool.stop_signal,
            signal_on_drain: pool.mode.drained_by() == DrainBy::Signal,
        });
        Ok(pid)
    }

    /// Starts `slot` now, or schedules a retry with backoff if that fails.
    pub(super) fn start_or_retry(&mut self, slot: Slot) {
        if let Err(e) = self.start(slot) {
            let s = &mut self.slots[slot.0];
            s.failures = s.failures.saturating_add(1);
            s.last_exit = e.to_string();
            let delay = backoff::delay(s.failures);
            s.restart_at = Some(Instant::now() + delay);
            info!("{e}; retrying in {} ms", delay.as_millis());
        }
    }
}
