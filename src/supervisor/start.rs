//! Starting a slot's worker: what its mode needs made first (the Node
//! preload, the shim, a port), the spawn, and telling the dispatcher.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::{CHILD_BASE, Supervisor, SupervisorError, Worker, backoff, output, preload, spawn};
use crate::config::Mode;
use crate::dispatch::Command;
use crate::info;
use crate::policy::Slot;

impl Supervisor {
    /// Starts the worker for `slot`; the error is fatal only at start-up.
    pub(super) fn start(&mut self, slot: Slot) -> Result<u32, SupervisorError> {
        let p = self
            .layout
            .pool(slot)
            .ok_or(SupervisorError::NoPool(slot.0))?;
        let generation = self.generation;
        info!(
            worker: self.about(slot, None); "worker {slot} gen {generation}: spawn `{}`",
            spawn::describe_command(&self.config.pools[p])
        );
        let report_closed = self.config.policy.uses_close_reports();
        let proxy_protocol = self.config.any_proxy_protocol();
        // Node workers need the preload for either.
        let node_preload = report_closed || proxy_protocol;
        self.make_once(p, node_preload)?;
        self.node_ids += 1;
        let instance = self.instance(slot, p);
        let pool = &self.config.pools[p];
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
        // Kernel dispatch: the worker's own listener, in lb's group.
        let own_listener = if self.kernel_dispatch {
            Some(
                crate::dispatch::kernel::slot_listener(
                    self.front,
                    self.config.listeners[0].backlog,
                )
                .map_err(|source| SupervisorError::Spawn {
                    pool: pool.name.clone(),
                    command: "the worker's own listener (kernel dispatch)".into(),
                    source,
                    hint: "check the fd limit",
                })?,
            )
        } else {
            None
        };
        let launch = spawn::Launch {
            slot,
            instance,
            generation,
            report_closed,
            proxy_protocol,
            node_id: self.node_ids,
            node_preload: self
                .node_preload
                .as_ref()
                .filter(|_| node_preload)
                .map(|p| p.file.as_path()),
            port: self.port,
            proxy_port,
            shim: self.shim.as_ref(),
            listeners: match &own_listener {
                Some(own) => vec![(own.as_raw_fd(), None)],
                None => self
                    .shared_listeners
                    .iter()
                    .map(|(fd, name)| (fd.as_raw_fd(), name.as_deref()))
                    .collect(),
            },
            own_listener: own_listener.is_some(),
            drain_timeout: self.config.drain_timeout,
            queue: self.config.worker_queue,
        };
        let spawned = spawn::spawn(pool, &launch).map_err(|source| {
            // ENOENT for a file that exists: exec could not find what the file needs.
            let hint = if source.kind() == io::ErrorKind::NotFound && pool.command.exists() {
                "the file exists, so its #! interpreter or its dynamic loader is missing"
            } else if source.kind() == io::ErrorKind::PermissionDenied
                && pool.run_as != Default::default()
            {
                "the pool's `user` must be allowed to run it (every directory on its path \
                 searchable) and to enter its `cwd`"
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
        let pid = spawned.pid;
        if let Some(r) = self.reaper.as_mut() {
            r.add(pid);
        }
        info!(
            worker: self.about(slot, Some(pid));
            "worker {slot} pid {pid} gen {generation}: online"
        );
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
                pool: pool.name.clone(),
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
            send_proxy: pool.send_proxy,
            listener: own_listener,
        });
        self.workers.push(Worker::new(
            slot,
            pool.name.clone(),
            pid,
            generation,
            spawned.pidfd,
            pool.stop_signal,
            pool.mode.drained_by(),
        ));
        Ok(pid)
    }

    /// What pool `p`'s mode needs made once for all its workers, the first
    /// time one starts: the Node preload (when the policy reads close
    /// reports, or lb reads PROXY headers), the accept shim.
    fn make_once(&mut self, p: usize, node_preload: bool) -> Result<(), SupervisorError> {
        let pool = &self.config.pools[p];
        let fail = |command: &str, hint| {
            let pool = pool.name.clone();
            let command = command.to_string();
            move |source| SupervisorError::Spawn {
                pool,
                command,
                source,
                hint,
            }
        };
        match pool.mode {
            // Workers of another user need one they can read (written
            // anew: those started already have loaded theirs).
            Mode::Node
                if node_preload
                    && self
                        .node_preload
                        .as_ref()
                        .is_none_or(|p| pool.run_as.ids.is_some() && !p.shared) =>
            {
                let preload = preload::Preload::write(pool.run_as.ids.is_some()).map_err(fail(
                    "the Node.js close-report preload",
                    "it is written to $XDG_RUNTIME_DIR or the temp directory; check that one is \
                     writable",
                ))?;
                self.node_preload = Some(preload);
            }
            Mode::Shim if self.shim.is_none() => {
                let shim = crate::shim::Memfd::create().map_err(fail(
                    "the accept shim (an in-memory file)",
                    "memfd_create failed; check the fd limit",
                ))?;
                self.shim = Some(shim);
            }
            Mode::Native | Mode::Node | Mode::Shim | Mode::Proxy | Mode::Shared => {}
        }
        Ok(())
    }

    /// Starts `slot` now, or schedules a retry with backoff if that fails.
    pub(super) fn start_or_retry(&mut self, slot: Slot) {
        // Scaled or reloaded away meanwhile: nothing to start, or retry.
        if !self.planned(slot) {
            return;
        }
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

impl Supervisor {
    /// `slot`'s instance number in pool `p` (PM2's `NODE_APP_INSTANCE`):
    /// the one it had, across restarts, unless another of the pool's slots
    /// holds it now; else the lowest the pool's other slots do not hold. So
    /// the numbers of a pool's running workers are distinct, and a pool
    /// that grows into a free lower slot gives nobody a second 0.
    fn instance(&mut self, slot: Slot, p: usize) -> usize {
        let name = self.config.pools[p].name.clone();
        let taken: Vec<usize> = self
            .layout
            .slots_of(p)
            .into_iter()
            .filter(|&s| s != slot)
            .filter_map(|s| match &self.slots.get(s.0)?.instance {
                Some((n, i)) if *n == name => Some(*i),
                _ => None,
            })
            .collect();
        let kept = match &self.slots[slot.0].instance {
            Some((n, i)) if *n == name && !taken.contains(i) => Some(*i),
            _ => None,
        };
        let i = kept.unwrap_or_else(|| (0..).find(|i| !taken.contains(i)).unwrap_or(0));
        self.slots[slot.0].instance = Some((name, i));
        i
    }
}
