//! Workers' stdout and stderr, line by line, each line with its slot, pid
//! and pool (like PM2's logs), on a thread of its own: a slow disk can
//! stall a worker's writes, never the dispatch loop or the supervisor.
//! Lines go to lb's log (through its queue, so a full or vanished stderr
//! drops and counts lines rather than blocking anyone), or to the files
//! the `--worker-log` pattern names, each opened once and reopened on
//! SIGUSR1.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::Supervisor;
use crate::log::{self, About, Stream};
use crate::policy::Slot;

const WAKER: Token = Token(0);
/// A line longer than this is written in pieces rather than buffered on.
const MAX_LINE: usize = 16 * 1024;

/// One of a worker's output pipes.
pub struct Pipe {
    pub slot: Slot,
    pub pid: u32,
    pub pool: String,
    pub stderr: bool,
    pub fd: OwnedFd,
}

enum Msg {
    Pipe(Pipe),
    /// Open every worker log file again (logrotate moved them).
    Reopen,
    /// `lb upgrade`: write out what was read, give every pipe back, end.
    HandBack(Sender<Vec<Pipe>>),
    Stop,
}

/// The output thread's handle.
pub struct Output {
    tx: Sender<Msg>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    /// Lines go to files, not to lb's log.
    files: bool,
}

impl Output {
    /// Starts the thread; lines go to the files `pattern` names (see
    /// `log::pattern`), or else to lb's log.
    pub fn start(pattern: Option<&Path>) -> io::Result<Output> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let files = Files {
            pattern: pattern.map(Path::to_path_buf),
            open: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("lb-output".into())
            .spawn(move || run(poll, rx, files))?;
        Ok(Output {
            tx,
            waker,
            thread: Some(thread),
            files: pattern.is_some(),
        })
    }

    /// Has the thread open its log files again (it says which in the log);
    /// false when there are none (lines go to lb's log).
    pub fn reopen(&self) -> bool {
        if self.files {
            let _ = self.tx.send(Msg::Reopen);
            let _ = self.waker.wake();
        }
        self.files
    }

    /// Every pipe still open, with what the thread read from it written
    /// out (the rest waits in the pipe for the next image); the thread ends.
    pub fn hand_back(&mut self) -> Vec<Pipe> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.tx.send(Msg::HandBack(tx));
        let _ = self.waker.wake();
        match rx.recv_timeout(std::time::Duration::from_secs(2)) {
            Ok(pipes) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                pipes
            }
            // Stuck writing (a worker log on a hung disk): not waited for;
            // the next image starts without the pipes it holds.
            Err(_) => {
                drop(self.thread.take());
                Vec::new()
            }
        }
    }

    /// Hands a worker's pipe to the thread.
    pub fn add(&self, pipe: Pipe) {
        let _ = self.tx.send(Msg::Pipe(pipe));
        let _ = self.waker.wake();
    }
}

impl Drop for Output {
    /// Writes out what the pipes still hold, then stops the thread.
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Source {
    slot: Slot,
    pid: u32,
    pool: String,
    stream: Stream,
    file: std::fs::File,
    buf: Vec<u8>,
    /// Its worker log file; `None`: lb's log.
    path: Option<PathBuf>,
}

impl Source {
    fn new(pipe: Pipe, files: &mut Files) -> Source {
        let stream = if pipe.stderr {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        let path = files.path_for(&pipe.pool, pipe.slot, stream);
        Source {
            slot: pipe.slot,
            pid: pipe.pid,
            pool: pipe.pool,
            stream,
            file: std::fs::File::from(pipe.fd),
            buf: Vec::new(),
            path,
        }
    }

    /// Writes every complete line (and an over-long partial one).
    fn flush_lines(&mut self, files: &mut Files, all: bool) {
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            self.write_line(files, start, start + nl);
            start += nl + 1;
        }
        if all || self.buf.len() - start >= MAX_LINE {
            if start < self.buf.len() {
                self.write_line(files, start, self.buf.len());
            }
            start = self.buf.len();
        }
        self.buf.drain(..start);
    }

    fn write_line(&self, files: &mut Files, from: usize, to: usize) {
        let line = &self.buf[from..to];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let about = About {
            slot: self.slot.0,
            pid: Some(self.pid),
            pool: &self.pool,
        };
        match &self.path {
            None => log::worker_line(&about, self.stream, line),
            Some(path) => files.write(path, &log::file_line(&about, self.stream, line)),
        }
    }
}

/// The worker log files, by the path the pattern gave.
struct Files {
    pattern: Option<PathBuf>,
    /// `None`: it could not be opened (said once; tried again on SIGUSR1
    /// and when another worker's pipe is for it).
    open: HashMap<PathBuf, Option<std::fs::File>>,
}

impl Files {
    /// The file for a new pipe's lines, opened now (so it exists from the
    /// worker's start on); `None` for lb's log.
    fn path_for(&mut self, pool: &str, slot: Slot, stream: Stream) -> Option<PathBuf> {
        let path = log::pattern::expand(self.pattern.as_deref()?, pool, slot.0, stream);
        if !matches!(self.open.get(&path), Some(Some(_))) {
            let opened = log::open_append(&path)
                .inspect_err(|e| {
                    crate::warn!(
                        "cannot open the worker log {} ({e}); its lines are dropped until it \
                         can be (SIGUSR1 tries again)",
                        path.display()
                    )
                })
                .ok();
            self.open.insert(path.clone(), opened);
        }
        Some(path)
    }

    fn write(&mut self, path: &Path, line: &[u8]) {
        if let Some(Some(f)) = self.open.get_mut(path) {
            // Nowhere to report a failing log sink; the line is dropped.
            let _ = f.write_all(line);
        }
    }

    /// Opens again every file a pipe still writes to (forgetting the
    /// others), and says so.
    fn reopen(&mut self, sources: &HashMap<Token, Source>) {
        self.open
            .retain(|path, _| sources.values().any(|s| s.path.as_deref() == Some(path)));
        let mut paths: Vec<PathBuf> = self.open.keys().cloned().collect();
        paths.sort();
        let mut done = Vec::new();
        for path in paths {
            match log::open_append(&path) {
                Ok(f) => {
                    done.push(path.display().to_string());
                    self.open.insert(path, Some(f));
                }
                Err(e) => crate::warn!(
                    "SIGUSR1: cannot reopen {} ({e}); its lines still go to the old file",
                    path.display()
                ),
            }
        }
        if done.is_empty() {
            crate::info!("SIGUSR1: no worker log file is open");
        } else {
            crate::info!("SIGUSR1: reopened {}", done.join(", "));
        }
    }
}

fn run(mut poll: Poll, rx: Receiver<Msg>, mut files: Files) {
    let mut sources: HashMap<Token, Source> = HashMap::new();
    let mut next = 1usize;
    let mut events = Events::with_capacity(64);
    let mut stopping = false;
    loop {
        if stopping && sources.is_empty() {
            return;
        }
        if let Err(e) = poll.poll(&mut events, None)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return;
        }
        for ev in events.iter() {
            if ev.token() == WAKER {
                while let Ok(msg) = rx.try_recv() {
                    match msg {
                        Msg::Pipe(pipe) => {
                            let token = Token(next);
                            next += 1;
                            let _ = nix::fcntl::fcntl(
                                &pipe.fd,
                                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                            );
                            let raw = pipe.fd.as_raw_fd();
                            if poll
                                .registry()
                                .register(&mut SourceFd(&raw), token, Interest::READABLE)
                                .is_ok()
                            {
                                sources.insert(token, Source::new(pipe, &mut files));
                                read_source(&mut poll, &mut sources, token, &mut files);
                            }
                        }
                        Msg::Reopen => files.reopen(&sources),
                        Msg::HandBack(reply) => {
                            let mut pipes = Vec::with_capacity(sources.len());
                            let tokens: Vec<Token> = sources.keys().copied().collect();
                            for t in tokens {
                                read_source(&mut poll, &mut sources, t, &mut files);
                                if let Some(mut s) = sources.remove(&t) {
                                    // A line cut here is written as two.
                                    s.flush_lines(&mut files, true);
                                    pipes.push(Pipe {
                                        slot: s.slot,
                                        pid: s.pid,
                                        pool: s.pool,
                                        stderr: s.stream == Stream::Stderr,
                                        fd: OwnedFd::from(s.file),
                                    });
                                }
                            }
                            let _ = reply.send(pipes);
                            return;
                        }
                        Msg::Stop => {
                            stopping = true;
                            // Workers are gone: read what is left, then end.
                            let tokens: Vec<Token> = sources.keys().copied().collect();
                            for t in tokens {
                                read_source(&mut poll, &mut sources, t, &mut files);
                                if let Some(mut s) = sources.remove(&t) {
                                    s.flush_lines(&mut files, true);
                                }
                            }
                        }
                    }
                }
            } else {
                read_source(&mut poll, &mut sources, ev.token(), &mut files);
            }
        }
    }
}

/// Reads until `EAGAIN`; at EOF writes the rest and forgets the pipe.
fn read_source(
    poll: &mut Poll,
    sources: &mut HashMap<Token, Source>,
    token: Token,
    files: &mut Files,
) {
    let Some(s) = sources.get_mut(&token) else {
        return;
    };
    let mut chunk = [0u8; 8192];
    loop {
        match (&s.file).read(&mut chunk) {
            Ok(0) => {
                s.flush_lines(files, true);
                let raw = s.file.as_raw_fd();
                let _ = poll.registry().deregister(&mut SourceFd(&raw));
                sources.remove(&token);
                return;
            }
            Ok(n) => {
                s.buf.extend_from_slice(&chunk[..n]);
                s.flush_lines(files, false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

impl Supervisor {
    /// What a log line about the worker in `slot` says of it.
    pub(super) fn about(&self, slot: Slot, pid: Option<u32>) -> About<'_> {
        // A worker draining in a slot scaled or reloaded away still has
        // the pool it started in.
        let own = pid.and_then(|pid| {
            self.workers
                .iter()
                .chain(self.exiting.iter().map(|e| &e.worker))
                .find(|w| w.pid == pid)
        });
        match own {
            Some(w) => About {
                slot: slot.0,
                pid,
                pool: &w.pool,
            },
            None => about(&self.config, &self.layout, slot, pid),
        }
    }
}

/// [`Supervisor::about`], for where a worker is borrowed mutably.
pub(super) fn about<'a>(
    config: &'a crate::config::Config,
    layout: &super::layout::Layout,
    slot: Slot,
    pid: Option<u32>,
) -> About<'a> {
    let pool = layout
        .pool(slot)
        .and_then(|p| config.pools.get(p))
        .map_or("", |p| p.name.as_str());
    {
        About {
            slot: slot.0,
            pid,
            pool,
        }
    }
}
