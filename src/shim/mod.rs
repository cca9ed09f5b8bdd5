//! The accept shim (`lbshim.c`), as the master handles it: the shared
//! object built by `build.rs` and embedded here, the in-memory file workers
//! load it from (`LD_PRELOAD=/proc/self/fd/N`), and the check that refuses
//! binaries it cannot work in (static, Go) before they are started.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// The shim, built from `src/shim/lbshim.c`.
pub const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/liblbshim.so"));

/// Environment a shim-mode worker gets besides lb's own `LB_FD`.
pub mod env {
    /// The TCP port whose `bind`/`listen` the shim takes over.
    pub const PORT: &str = "LB_SHIM_PORT";
    /// The fd of the in-memory shim (closed on exec once claimed).
    pub const FD: &str = "LB_SHIM_FD";
    /// The signal DRAIN becomes (the pool's `stop_signal`, a number).
    pub const STOP_SIGNAL: &str = "LB_STOP_SIGNAL";
    pub const PRELOAD: &str = "LD_PRELOAD";
}

/// The shim in a sealed in-memory file; workers inherit its fd.
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    pub fn create() -> io::Result<Memfd> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(
            c"lb-accept-shim.so",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(LIBRARY)?;
        // Read-only from now on: no worker can change what the next one loads.
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_WRITE
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Ok(Memfd {
            fd: OwnedFd::from(file),
        })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `LD_PRELOAD` for a worker that inherits this fd at the same number,
    /// in front of any preload the worker already has.
    pub fn preload(&self, theirs: Option<&str>) -> String {
        let ours = format!("/proc/self/fd/{}", self.raw());
        match theirs.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => format!("{ours} {t}"),
            None => ours,
        }
    }
}

/// Why `program` cannot run with the shim, if it cannot: a statically
/// linked binary ignores `LD_PRELOAD`, and Go makes raw syscalls. Scripts
/// (`#!`) and anything unreadable pass: their interpreter is checked by use.
pub fn unsupported(program: &Path) -> Option<&'static str> {
    let bytes = std::fs::read(program).ok()?;
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    if memchr_find(&bytes, b"\xff Go buildinf:") {
        return Some("is a Go program, which makes raw syscalls the shim cannot see");
    }
    match has_interpreter(&bytes) {
        Some(false) => Some("is statically linked, so it ignores LD_PRELOAD"),
        _ => None,
    }
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether an ELF file has a `PT_INTERP` program header (is dynamically
/// linked); `None` when the headers cannot be read.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let class64 = *elf.get(4)? == 2;
    let little = *elf.get(5)? == 1;
    let u16_at = |o: usize| -> Option<u64> {
        let b: [u8; 2] = elf.get(o..o + 2)?.try_into().ok()?;
        Some(u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = elf.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = elf.get(o..o + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?)
    };
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).ok()?;
        if u32_at(at)? == u64::from(PT_INTERP) {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_an_elf_shared_object() {
        assert!(LIBRARY.starts_with(b"\x7fELF"));
        assert!(memchr_find(LIBRARY, b"LB_SHIM_PORT"));
    }

    #[test]
    fn dynamic_binaries_pass_and_scripts_are_not_judged() {
        assert_eq!(unsupported(Path::new("/bin/sh")), None);
        assert_eq!(
            has_interpreter(&std::fs::read("/bin/sh").unwrap()),
            Some(true)
        );
        let dir = std::env::temp_dir().join(format!("lb-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(unsupported(&script), None);
        // A static binary, when the toolchain can make one.
        let c = dir.join("t.c");
        std::fs::write(&c, "int main(void){return 0;}\n").unwrap();
        let bin = dir.join("t");
        let built = std::process::Command::new("cc")
            .arg("-static")
            .arg("-o")
            .arg(&bin)
            .arg(&c)
            .status()
            .is_ok_and(|s| s.success());
        if built {
            assert_eq!(
                unsupported(&bin),
                Some("is statically linked, so it ignores LD_PRELOAD")
            );
        } else {
            eprintln!("no static libc here: the static-binary case is not exercised");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memfd_holds_the_library() {
        let m = Memfd::create().unwrap();
        let read = std::fs::read(format!("/proc/self/fd/{}", m.raw())).unwrap();
        assert_eq!(read, LIBRARY);
        assert_eq!(
            m.preload(Some("libx.so")),
            format!("/proc/self/fd/{} libx.so", m.raw())
        );
    }
}

/// The shim under kernel dispatch (`LB_OWN_LISTENER=1`) against a fake
/// master: a real channel, a real listener sent as `LISTENER`, Python's own
/// servers (`http.server`, `asyncio`) doing their own accepts.
#[cfg(test)]
mod kernel_tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::proto::{self, Wait, kind, scm, wire};

    const WAIT: Duration = Duration::from_secs(10);

    struct Fake {
        chan: OwnedFd,
        listener: TcpListener,
        server: Child,
        dir: std::path::PathBuf,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Starts `python3 args…` ({port} replaced) with the shim, its channel
    /// at fd 3, under kernel dispatch; nothing is sent yet.
    fn start(name: &str, args: &[&str], reports: bool) -> Fake {
        let dir = std::env::temp_dir().join(format!("lb-kshim-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let so = dir.join("liblbshim.so");
        std::fs::write(&so, super::LIBRARY).unwrap();
        std::fs::write(dir.join("index.html"), "hello\n").unwrap();
        // What the master makes: bound to lb's address, listening, blocking.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let (chan, worker_end) = proto::pair().unwrap();
        let mut cmd = Command::new("python3");
        cmd.args(args.iter().map(|a| a.replace("{port}", &port)))
            .current_dir(&dir)
            .env("LB_FD", "3")
            .env("LB_SHIM_PORT", &port)
            .env("LB_PROTOCOL", "1")
            .env("LB_OWN_LISTENER", "1")
            .env("LB_REPORT_CLOSED", if reports { "1" } else { "0" })
            .env("LD_PRELOAD", &so)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        crate::sys::prepare_child(&mut cmd, Some(worker_end.as_raw_fd()), proto::WORKER_FD);
        let server = cmd.spawn().unwrap();
        drop(worker_end);
        Fake {
            chan,
            listener,
            server,
            dir,
        }
    }

    impl Fake {
        fn port(&self) -> u16 {
            self.listener.local_addr().unwrap().port()
        }

        fn send(&self, kind: u8, fd: Option<std::os::fd::BorrowedFd<'_>>) {
            let h = wire::header(kind, 0);
            scm::send(self.chan.as_fd(), &h, &[], fd, Wait::Block).unwrap();
        }

        /// The next message from the worker (kind, value), or None by `until`.
        fn next(&self, until: Instant) -> Option<(u8, u64)> {
            let mut buf = [0u8; wire::MAX_MESSAGE];
            loop {
                match scm::recv(self.chan.as_fd(), &mut buf, Wait::DontWait) {
                    Ok(r) if r.len == 0 => return None,
                    Ok(r) => {
                        assert!(r.fds.is_empty(), "the worker sent fds");
                        wire::parse(&buf[..r.len], r.truncated).expect("a well-formed message");
                        let v = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                        return Some((buf[1], v));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > until {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("channel: {e}"),
                }
            }
        }

        /// What the server wrote to stderr (after it exited).
        fn stderr(&mut self) -> String {
            let mut s = String::new();
            if let Some(mut e) = self.server.stderr.take() {
                let _ = e.read_to_string(&mut s);
            }
            s
        }

        fn exited_within(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
            let until = Instant::now() + d;
            while Instant::now() < until {
                if let Some(s) = self.server.try_wait().unwrap() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        }

        /// The server's fd that is our listener (same socket inode), and
        /// its fdinfo flags (octal).
        fn servers_copy(&self) -> Option<(i32, u32)> {
            let ino = std::fs::metadata(format!("/proc/self/fd/{}", self.listener.as_raw_fd()))
                .unwrap()
                .ino();
            let pid = self.server.id();
            let want = format!("socket:[{ino}]");
            for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
                let e = e.ok()?;
                if std::fs::read_link(e.path()).ok()?.to_str() == Some(want.as_str()) {
                    let n: i32 = e.file_name().to_str()?.parse().ok()?;
                    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
                    let flags = info
                        .lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())?;
                    return Some((n, flags));
                }
            }
            None
        }
    }

    fn get(port: u16, keep_alive: bool) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn = if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        let request = format!("GET /index.html HTTP/1.0\r\nHost: x\r\n{conn}\r\n");
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn python() -> bool {
        let ok = Command::new("python3")
            .arg("-c")
            .arg("pass")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: no python3");
        }
        ok
    }

    /// http.server's own accept loop on the listener lb sent: READY says
    /// OWN_LISTENER, every connection is reported ACCEPTED then CLOSED,
    /// DRAIN is answered with STOP though no accept reads the channel.
    #[test]
    fn the_server_accepts_from_its_own_listener_and_reports() {
        if !python() {
            return;
        }
        let args = [
            "-m",
            "http.server",
            "{port}",
            "--bind",
            "127.0.0.1",
            "--directory",
            ".",
        ];
        let mut f = start("http", &args, true);
        f.send(kind::LISTENER, Some(f.listener.as_fd()));
        let until = Instant::now() + WAIT;
        assert_eq!(
            f.next(until),
            Some((kind::READY, wire::ready::OWN_LISTENER)),
            "{}",
            {
                let _ = f.server.kill();
                f.stderr()
            }
        );
        // The server's socket is now our listener: blocking (as Python's
        // was) and CLOEXEC (as Python makes every socket).
        let (_, flags) = f.servers_copy().expect("the server holds the listener");
        assert_eq!(flags & libc::O_NONBLOCK as u32, 0, "flags {flags:o}");
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "flags {flags:o}");
        let n = 30;
        for i in 0..n {
            let body = get(f.port(), i % 2 == 0);
            assert!(body.ends_with("hello\n"), "{body}");
        }
        let (mut accepted, mut closed) = (0, 0);
        let until = Instant::now() + WAIT;
        while (accepted, closed) != (n, n) {
            match f.next(until) {
                Some((kind::ACCEPTED, v)) => accepted += v,
                Some((kind::CLOSED, v)) => {
                    closed += v;
                    assert!(closed <= accepted, "CLOSED before its ACCEPTED");
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("reports stopped at {accepted} accepted, {closed} closed"),
            }
        }
        f.send(kind::DRAIN, None);
        assert_eq!(f.next(Instant::now() + WAIT), Some((kind::STOP, 0)));
        // The master would now send SIGTERM; it ends http.server.
        f.server.kill().unwrap();
        f.server.wait().unwrap();
    }

    /// asyncio sets its socket non-blocking before listen(): the listener
    /// becomes non-blocking too; without LB_REPORT_CLOSED nothing is
    /// reported; the master's end of the channel ends the server.
    #[test]
    fn a_non_blocking_server_gets_a_non_blocking_listener_and_eof_stops_it() {
        if !python() {
            return;
        }
        let app = r#"
import asyncio, os, sys
async def serve(r, w):
    await r.readuntil(b"\r\n\r\n")
    w.write(b"HTTP/1.0 200 OK\r\n\r\nhello from pid %d\n" % os.getpid())
    await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
"#;
        let mut f = start("asyncio", &["-c", app, "{port}"], false);
        f.send(kind::LISTENER, Some(f.listener.as_fd()));
        assert_eq!(
            f.next(Instant::now() + WAIT),
            Some((kind::READY, wire::ready::OWN_LISTENER))
        );
        let (_, flags) = f.servers_copy().expect("the server holds the listener");
        assert_ne!(flags & libc::O_NONBLOCK as u32, 0, "flags {flags:o}");
        for _ in 0..10 {
            let body = get(f.port(), false);
            assert!(body.contains("hello from pid"), "{body}");
        }
        assert_eq!(f.next(Instant::now() + Duration::from_millis(300)), None);
        // lb is gone: the shim stops the server with its stop signal.
        let Fake { chan, .. } = &mut f;
        let _ = std::mem::replace(chan, proto::pair().unwrap().0);
        assert!(f.exited_within(WAIT).is_some(), "the server outlived lb");
    }

    /// A server that registers its socket with epoll before it listens: the
    /// registration went with the socket the listener replaced, so the
    /// shim makes it again on the listener (else the server would wait
    /// forever while the kernel queues its connections).
    #[test]
    fn an_epoll_registration_made_before_listen_follows_the_listener() {
        if !python() {
            return;
        }
        let app = r#"
import os, select, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLIN | select.EPOLLERR)
ep.modify(s.fileno(), select.EPOLLIN)
s.listen()
while True:
    for fd, ev in ep.poll():
        c, _ = s.accept()
        req = b""
        while b"\r\n\r\n" not in req:
            req += c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello from pid %d\n" % os.getpid())
        c.close()
"#;
        let f = start("early", &["-c", app, "{port}"], true);
        f.send(kind::LISTENER, Some(f.listener.as_fd()));
        assert_eq!(
            f.next(Instant::now() + WAIT),
            Some((kind::READY, wire::ready::OWN_LISTENER))
        );
        for _ in 0..20 {
            let body = get(f.port(), false);
            assert!(body.contains("hello from pid"), "{body}");
        }
    }

    /// Anything but a LISTENER with one listening TCP socket: listen()
    /// fails with a line on stderr, the fds are closed, nothing crashes.
    #[test]
    fn a_wrong_first_message_fails_listen_in_one_line() {
        if !python() {
            return;
        }
        let app = "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', \
                   int(sys.argv[1])))\ntry:\n    s.listen()\nexcept OSError as e:\n    \
                   print('listen failed:', e, file=sys.stderr)\n    sys.exit(7)\n";
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cases: [(&str, u8, Option<std::os::fd::BorrowedFd<'_>>); 3] = [
            ("no fd", kind::LISTENER, None),
            ("not a listener", kind::LISTENER, Some(udp.as_fd())),
            ("a CONN", kind::CONN, Some(udp.as_fd())),
        ];
        for (what, k, fd) in cases {
            let mut f = start("wrong", &["-c", app, "{port}"], true);
            f.send(k, fd);
            let status = f.exited_within(WAIT).expect("listen() returned");
            let err = f.stderr();
            assert_eq!(status.code(), Some(7), "{what}: {err}");
            assert!(
                err.contains("lb accept shim: listen() on port")
                    && err.contains("not a LISTENER with one listening TCP socket"),
                "{what}: {err}"
            );
            assert_eq!(f.next(Instant::now()), None, "{what}: no READY");
        }
    }
}
