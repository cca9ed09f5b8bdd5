//! Workers' stdout and stderr, line by line, prefixed with slot and pid
//! (like PM2's merged logs), on a thread of its own: a slow disk can stall
//! a worker's writes, never the dispatch loop or the supervisor. Lines for
//! lb's stderr go through the master's log queue (`crate::log`), so a full
//! or vanished stderr drops (and counts) lines rather than blocking anyone.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::policy::Slot;

const WAKER: Token = Token(0);
/// A line longer than this is written in pieces rather than buffered on.
const MAX_LINE: usize = 16 * 1024;

/// One of a worker's output pipes.
pub struct Pipe {
    pub slot: Slot,
    pub pid: u32,
    pub stderr: bool,
    pub fd: OwnedFd,
}

enum Msg {
    Pipe(Pipe),
    /// Write to this from now on (the log file, reopened).
    Sink(Box<dyn Write + Send>),
    Stop,
}

/// The output thread's handle.
pub struct Output {
    tx: Sender<Msg>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    /// The worker log file, if lines go to one.
    file: Option<PathBuf>,
}

/// Opens the worker log for appending. Without waiting: a FIFO with no
/// reader (or the like) fails instead of stalling the supervisor, which
/// reopens on SIGUSR1; writes then block only the output thread.
fn open_log(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(blocking))?;
    Ok(Box::new(file))
}

impl Output {
    /// Starts the thread; lines go to `file` (appended) or else to stderr.
    pub fn start(file: Option<&Path>) -> io::Result<Output> {
        let sink: Box<dyn Write + Send> = match file {
            Some(path) => open_log(path)?,
            None => Box::new(crate::log::Lines),
        };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("lb-output".into())
            .spawn(move || run(poll, rx, sink))?;
        Ok(Output {
            tx,
            waker,
            thread: Some(thread),
            file: file.map(Path::to_path_buf),
        })
    }

    /// Opens the worker log file again (after logrotate moved it) and
    /// writes there from now on; `None` when lines go to stderr.
    pub fn reopen(&self) -> Option<io::Result<&Path>> {
        let path = self.file.as_deref()?;
        Some(open_log(path).map(|sink| {
            let _ = self.tx.send(Msg::Sink(sink));
            let _ = self.waker.wake();
            path
        }))
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
    prefix: String,
    file: std::fs::File,
    buf: Vec<u8>,
}

impl Source {
    fn new(pipe: Pipe) -> Source {
        let stream = if pipe.stderr { " stderr" } else { "" };
        Source {
            prefix: format!("[worker {} pid {}{stream}] ", pipe.slot, pipe.pid),
            file: std::fs::File::from(pipe.fd),
            buf: Vec::new(),
        }
    }

    /// Writes every complete line (and an over-long partial one).
    fn flush_lines(&mut self, sink: &mut dyn Write, all: bool) {
        let prefix = &self.prefix;
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            write_line(sink, prefix, &self.buf[start..start + nl]);
            start += nl + 1;
        }
        if all || self.buf.len() - start >= MAX_LINE {
            if start < self.buf.len() {
                write_line(sink, prefix, &self.buf[start..]);
            }
            start = self.buf.len();
        }
        self.buf.drain(..start);
    }
}

fn write_line(sink: &mut dyn Write, prefix: &str, line: &[u8]) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // No carriage return or terminal escape can make it look like lb's own.
    let line = crate::log::escape(line);
    let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    // Nowhere to report a failing log sink; the line is dropped.
    let _ = sink.write_all(&out);
}

fn run(mut poll: Poll, rx: Receiver<Msg>, mut sink: Box<dyn Write + Send>) {
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
                                sources.insert(token, Source::new(pipe));
                                read_source(&mut poll, &mut sources, token, &mut *sink);
                            }
                        }
                        Msg::Sink(new) => {
                            let _ = sink.flush();
                            sink = new;
                        }
                        Msg::Stop => {
                            stopping = true;
                            // Workers are gone: read what is left, then end.
                            let tokens: Vec<Token> = sources.keys().copied().collect();
                            for t in tokens {
                                read_source(&mut poll, &mut sources, t, &mut *sink);
                                if let Some(mut s) = sources.remove(&t) {
                                    s.flush_lines(&mut *sink, true);
                                }
                            }
                        }
                    }
                }
            } else {
                read_source(&mut poll, &mut sources, ev.token(), &mut *sink);
            }
        }
        let _ = sink.flush();
    }
}

/// Reads until `EAGAIN`; at EOF writes the rest and forgets the pipe.
fn read_source(
    poll: &mut Poll,
    sources: &mut HashMap<Token, Source>,
    token: Token,
    sink: &mut dyn Write,
) {
    let Some(s) = sources.get_mut(&token) else {
        return;
    };
    let mut chunk = [0u8; 8192];
    loop {
        match (&s.file).read(&mut chunk) {
            Ok(0) => {
                s.flush_lines(sink, true);
                let raw = s.file.as_raw_fd();
                let _ = poll.registry().deregister(&mut SourceFd(&raw));
                sources.remove(&token);
                return;
            }
            Ok(n) => {
                s.buf.extend_from_slice(&chunk[..n]);
                s.flush_lines(sink, false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}
