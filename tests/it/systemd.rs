//! systemd: readiness notifications to NOTIFY_SOCKET, socket activation
//! with LISTEN_FDS, and neither leaking into the workers.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn environ(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/environ")).unwrap()
}

#[test]
fn sd_notify_says_ready_reloading_and_stopping() {
    let dir = scratch("notify");
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut lb = Lb::start(
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
        2,
    );
    let mut buf = [0u8; 256];
    // STATUS= lines (tests/it/systemd_ops.rs) come in between.
    let mut next = || loop {
        let n = sock.recv(&mut buf).expect("a notification");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !text.starts_with("STATUS=") {
            break text;
        }
    };
    assert_eq!(next(), "READY=1", "once every first worker is ready");
    assert!(
        !environ(lb.pid_of_slot(0)).contains("NOTIFY_SOCKET="),
        "not the workers'"
    );

    lb.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next(), "READY=1", "after the reload");

    lb.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert_eq!(lb.wait_exit().code(), Some(0));
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        assert!(buf[..n].starts_with(b"STATUS="), "nothing more");
    }
}

#[test]
fn socket_activation_serves_the_inherited_listener() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Inheritable, like a systemd socket; the shell puts it at fd 3 and makes
    // LISTEN_PID its own pid, which lb keeps across exec.
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let fd = listener.as_raw_fd();
    let control = scratch("activation").join("lb.sock");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec \"$0\" \"$@\""
        ))
        .arg(lb_bin())
        .args(["--workers", "2", "--control", control.to_str().unwrap()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("LB_") || k == "SCHED_POLICY" {
            cmd.env_remove(k);
        }
    }
    let lb = Lb::start_command(cmd, 2);
    drop(listener);
    assert_eq!(
        lb.addr, addr,
        "lb listens where systemd bound, not on its default"
    );
    assert_eq!(split(addr, 2, 10), [5, 5]);
    let env = environ(lb.pid_of_slot(0));
    assert!(
        !env.contains("LISTEN_FDS=") && !env.contains("LISTEN_PID="),
        "not the workers'"
    );
}

#[test]
fn an_activated_fd_that_is_not_a_listener_is_refused() {
    // fd 3 is a plain file, with LISTEN_PID/LISTEN_FDS claiming a socket.
    let dir = scratch("activation-bad");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<{}; LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --workers 1 --control {}",
            file.display(),
            dir.join("lb.sock").display()
        ))
        .arg(lb_bin())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a listening TCP or Unix stream socket"),
        "{err}"
    );
}
