//! `--mode shared`: every worker gets lb's listener as fd 3 (systemd's
//! LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, einhorn's EINHORN_FD_*) and the
//! kernel balances; lb supervises. Tried with gunicorn (socket activation)
//! and a Python server that checks every variable.

use crate::util::*;

/// A server that refuses to start unless the inherited-listener variables
/// are exactly right, then serves until SIGTERM (finishing its request).
const CHECKER: &str = r#"
import os, signal, socket, sys
assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not this process"
assert os.environ["LISTEN_FDS"] == "1" and os.environ["LISTEN_FDNAMES"] == "web"
assert os.environ["EINHORN_FD_COUNT"] == "1" and os.environ["EINHORN_FD_0"] == "3"
s = socket.socket(fileno=3)
assert s.type == socket.SOCK_STREAM and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
stopping = False
def term(*_):
    global stopping
    stopping = True
# The signal that means "finish and stop" (the pool's stop_signal).
signal.signal(getattr(signal, os.environ.get("APP_STOP", "SIGTERM")), term)
s.settimeout(0.05)
print("serving", flush=True)
body = ("hello from worker %s (pid %d)\n" % (os.environ["LB_WORKER_ID"], os.getpid())).encode()
while not stopping:
    try:
        c, _ = s.accept()
    except (socket.timeout, InterruptedError):
        continue
    c.settimeout(None)
    req = b""
    while b"\r\n\r\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            break
        req += chunk
    if req.startswith(b"GET /slow"):
        import time; time.sleep(0.6)
    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    c.close()
"#;

fn checker(dir: &std::path::Path) -> String {
    let p = dir.join("checker.py");
    std::fs::write(&p, CHECKER).unwrap();
    p.to_str().unwrap().to_string()
}

fn shared_pool(script: &str, count: usize) -> String {
    format!(
        "mode = \"shared\"\n[[pool]]\nname = \"web\"\ncommand = \"python3\"\nargs = [\"{script}\"]\ncount = {count}\n"
    )
}

#[test]
fn shared_workers_are_stopped_with_the_pools_stop_signal() {
    let dir = scratch("shared-quit");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "{}stop_signal = \"QUIT\"\nenv = {{ APP_STOP = \"SIGQUIT\" }}\n",
            shared_pool(&checker(&dir), 1)
        ),
    );
    let mut lb = Lb::start(&["--config", &config], &[], 1);
    lb.wait_log("] serving", 1);
    // SIGTERM would have killed it (Python's default); SIGQUIT is the one
    // this server finishes on.
    assert!(lb.stop_during("/slow").starts_with("hello"));
    assert_eq!(lb.log.count("exit (exit code 0"), 1);
}

#[test]
fn shared_workers_get_the_listener_and_every_variable() {
    let dir = scratch("shared");
    let config = write_config(&dir, "lb.toml", &shared_pool(&checker(&dir), 2));
    let lb = Lb::start(&["--config", &config, "--policy", "lc"], &[], 2);
    lb.wait_log("policy least-conn has no effect in shared mode", 1);
    lb.wait_log("] serving", 2);
    for _ in 0..20 {
        assert!(get(lb.addr, "/").starts_with("hello from worker"));
    }
    // Four slow requests at once on two one-at-a-time workers: the kernel
    // must give both of them some.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let addr = lb.addr;
            std::thread::spawn(move || slot_of(&get(addr, "/slow")))
        })
        .collect();
    let slots: Vec<usize> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(slots.contains(&0) && slots.contains(&1), "{slots:?}");
}

#[test]
fn shared_kill_9_and_graceful_stop() {
    let dir = scratch("shared-kill");
    let config = write_config(&dir, "lb.toml", &shared_pool(&checker(&dir), 2));
    let mut lb = Lb::start(&["--config", &config], &[], 2);
    // The restarted worker takes connections from the shared listener.
    kill_under_load(&lb, 0, 2, "shared");
    // Graceful stop: SIGTERM to each worker, which finishes its request.
    assert!(lb.stop_during("/slow").starts_with("hello"));
}

#[test]
fn shared_gunicorn_uses_the_activated_socket() {
    if !installed("gunicorn", "the gunicorn shared-mode test") {
        return;
    }
    let dir = scratch("shared-gunicorn");
    gunicorn_app(&dir);
    let mut cmd = lb_command(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--mode",
            "shared",
            "--control",
            dir.join("lb.sock").to_str().unwrap(),
            "--",
            "gunicorn",
            "--workers",
            "1",
            "--chdir",
            dir.to_str().unwrap(),
            "app:app",
        ],
        &[],
    );
    cmd.current_dir(&dir);
    let mut lb = Lb::start_command(cmd, 2);
    // gunicorn takes fd 3 only when LISTEN_PID is its own pid; otherwise it
    // would bind 127.0.0.1:8000 itself.
    lb.wait_log(&format!("Listening at: http://{}", lb.addr), 2);
    for _ in 0..20 {
        assert!(get(lb.addr, "/").starts_with("hello from worker"));
    }
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit().success());
}

#[test]
fn shared_cannot_be_mixed_with_other_modes() {
    let dir = scratch("shared-mixed");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!(
            "[[pool]]\nname = \"a\"\ncommand = \"sh\"\nmode = \"shared\"\n{}",
            hello_pool("b", 1)
        ),
    );
    let (status, log) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("mode shared cannot be mixed"), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");
}
