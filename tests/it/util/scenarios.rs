//! Scenarios several test files run: a worker killed under load,
//! least-connections against long-lived connections, a stop mid-request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    KeepAlive, Lb, WAIT, looping_clients, pid_of, read_body, send_request_to, send_signal, slot_of,
    split, try_get,
};

/// lb, round-robin, over a worker that says READY (with `flags`) and then
/// never reads its channel (slot 0), and a bundled worker (slot 1); and the
/// stuck one's pid.
pub fn stuck_beside_hello(name: &str, flags: u64) -> (Lb, u32) {
    let dir = super::scratch(name);
    let stuck = super::python_worker(
        &dir,
        "stuck.py",
        &format!("send(16, {flags})\ntime.sleep(600)"),
    );
    let config = super::write_config(
        &dir,
        "lb.toml",
        &format!(
            "policy = \"rr\"\n{}{}",
            super::python_pool("stuck", &stuck, 1),
            super::hello_pool("hello", 1)
        ),
    );
    let lb = Lb::start(&["--config", &config], &[], 2);
    let stuck_pid = lb.pid_of_slot(0);
    (lb, stuck_pid)
}

/// Reads the answer on each of `requests` (sent, not read), each in a
/// thread; once `first` have come, kills `victim` with SIGKILL (what it
/// held unread in its channel is then the master's to rescue); every
/// body, in order.
pub fn kill_once_answered(
    requests: Vec<std::net::TcpStream>,
    first: usize,
    victim: u32,
) -> Vec<std::io::Result<String>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let answered = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = requests
        .into_iter()
        .map(|s| {
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                let body = read_body(s);
                answered.fetch_add(1, Ordering::SeqCst);
                body
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while answered.load(Ordering::SeqCst) < first {
        assert!(
            Instant::now() < deadline,
            "the live worker did not answer its share"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    send_signal(victim, libc::SIGKILL);
    readers.into_iter().map(|r| r.join().unwrap()).collect()
}

/// Kills `slot`'s worker with SIGKILL while 4 clients loop on new
/// connections, waits (bounded) until its replacement has served a
/// request, stops the clients; (requests served, failed). `workers` is the
/// master's worker count (for the READY lines to wait for).
pub fn kill_under_load(lb: &Lb, slot: usize, workers: usize, what: &str) -> (u64, u64) {
    let victim = lb.pid_of_slot(slot);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = looping_clients(lb.addr, &stop);
    std::thread::sleep(Duration::from_millis(300)); // load is flowing
    send_signal(victim, libc::SIGKILL);
    lb.wait_log(&format!("worker {slot} gen 1: spawn"), 2);
    lb.wait_log(": ready", workers + 1);
    let replacement = lb.pid_of_slot(slot);
    let deadline = Instant::now() + WAIT;
    while !(0..20).any(|_| try_get(lb.addr, "/").is_ok_and(|b| pid_of(&b) == replacement)) {
        assert!(
            Instant::now() < deadline,
            "the restarted worker got nothing"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    eprintln!(
        "{what} kill -9 under load: {} requests, {failed} failed",
        ok + failed
    );
    // Four clients, one request each in flight: at most those the dead
    // worker held can fail.
    assert!(failed <= 4, "{failed} failures");
    assert!(ok > 0, "load kept flowing");
    (ok, failed)
}

/// Least-connections against long-lived connections: eight kept-alive
/// connections split 4/4 over two workers, worker 1's are released, and
/// the split of 40 short requests that follows is returned (worker 0
/// still holds four).
pub fn split_after_worker_0_holds_four(addr: SocketAddr) -> Vec<usize> {
    let mut held: Vec<(usize, KeepAlive)> = (0..8)
        .map(|_| {
            let mut c = KeepAlive::open(addr);
            (slot_of(&c.get("/")), c)
        })
        .collect();
    let per: Vec<usize> = (0..2)
        .map(|s| held.iter().filter(|(w, _)| *w == s).count())
        .collect();
    assert_eq!(per, [4, 4]);
    held.retain(|(w, _)| *w == 0);
    let count = split(addr, 2, 40);
    drop(held);
    count
}

impl Lb {
    /// SIGTERM while a request for `path` is in flight (sent 200 ms before):
    /// the response must arrive and the master exit 0. Returns its body.
    pub fn stop_during(&mut self, path: &'static str) -> String {
        let addr = self.addr;
        let slow = std::thread::spawn(move || read_body(send_request_to(addr, path)));
        std::thread::sleep(Duration::from_millis(200));
        self.signal(libc::SIGTERM);
        let body = slow
            .join()
            .unwrap()
            .expect("the slow response arrives whole");
        let status = self.wait_exit();
        assert!(status.success(), "drained cleanly: {status:?}");
        body
    }
}
