//! Unmodified Node.js apps as workers (`--mode node`): lb is their cluster
//! primary. Every test runs against each Node version installed (see
//! `util::node_binaries`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// Runs `test` once per installed Node binary.
fn each_node(test: impl Fn(&str)) {
    for (bin, version) in node_binaries() {
        eprintln!("== Node {version} ({bin})");
        test(&bin);
    }
}

fn start(node: &str, workers: usize, args: &[&str], env: &[(&str, &str)]) -> Lb {
    let app = node_app();
    let n = workers.to_string();
    let mut full = vec!["--workers", n.as_str()];
    full.extend_from_slice(args);
    full.extend(["--", node, app.as_str()]);
    Lb::start(&full, env, workers)
}

#[test]
fn node_app_round_robin_is_exact_and_every_request_is_served() {
    each_node(|node| {
        let lb = start(node, 3, &[], &[]);
        assert!(
            lb.log.count("mode node") == 1,
            "node mode chosen for `node`"
        );
        assert_eq!(split(lb.addr, 3, 150), [50, 50, 50]);
        // Concurrent clients: every connection answered.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let addr = lb.addr;
                std::thread::spawn(move || (0..50).filter(|_| try_get(addr, "/").is_ok()).count())
            })
            .collect();
        let served: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(served, 400);
        // The app's `process.send` reaches lb's log.
        lb.wait_log("message: {\"listening\":8000", 3);
    });
}

#[test]
fn node_worker_killed_under_load_is_restarted() {
    each_node(|node| {
        let lb = start(node, 2, &[], &[]);
        kill_under_load(&lb, 0, 2, "node");
        assert!(lb.log.count("exit (killed by SIGKILL") == 1);
    });
}

#[test]
fn node_graceful_stop_lets_a_slow_response_finish() {
    each_node(|node| {
        let mut lb = start(node, 2, &[], &[]);
        let pids = [lb.pid_of_slot(0), lb.pid_of_slot(1)];
        // Its first chunk takes 100 ms: the response is under way.
        let body = lb.stop_during("/chunks");
        assert!(
            body.contains("chunk 9") && body.contains("hello from worker"),
            "{body:?}"
        );
        for pid in pids {
            assert!(!alive(pid), "worker {pid} outlived the master");
        }
        assert_eq!(lb.log.count("exit (exit code 0"), 2);
    });
}

#[test]
fn node_least_conn_steers_away_from_long_lived_connections() {
    each_node(|node| {
        let lb = start(node, 2, &["--policy", "lc"], &[]);
        // Worker 1's closes reach lb through the preload's reports.
        let count = split_after_worker_0_holds_four(lb.addr);
        assert!(
            count[1] >= 36,
            "least-conn should avoid the worker holding 4: {count:?}"
        );
    });
}

#[test]
fn node_messages_flow_both_ways() {
    each_node(|node| {
        let lb = start(node, 2, &[], &[]);
        lb.wait_log("message: {\"listening\":8000", 2);
        let out = lb.ctl(&["send", "all", "{\"ping\":7}"]);
        assert!(out.contains('2'), "sent to both: {out}");
        lb.wait_log("message: {\"pong\":7", 2);
        let out = lb.ctl(&["send", "1", "{\"ping\":8}"]);
        assert!(out.contains('1'), "{out}");
        lb.wait_log("message: {\"pong\":8,\"id\":\"1\"}", 1);
    });
}

#[test]
fn node_listens_lb_cannot_serve_fail_in_the_app_with_a_reason_in_the_log() {
    each_node(|node| {
        let dir = scratch("node-pipe");
        let pipe = dir.join("app.sock");
        let pipe = pipe.to_str().unwrap();
        let lb = start(node, 1, &[], &[("APP_SECOND", "9"), ("APP_PIPE", pipe)]);
        // The app sees the errors; its main server still serves.
        lb.wait_log("message: {\"second\":\"ENOTSUP\"}", 1);
        lb.wait_log("message: {\"pipe\":\"ENOTSUP\"}", 1);
        lb.wait_log("a second listen() (port 9) refused", 1);
        lb.wait_log("listen() on the Unix socket", 1);
        assert!(get(lb.addr, "/").starts_with("hello from worker 0"));
    });
}

#[test]
fn node_refused_connections_go_elsewhere_without_a_busy_loop() {
    each_node(|node| {
        // Each worker takes one connection at a time; four slow requests
        // on two workers: two are refused until a worker frees up.
        let mut lb = start(node, 2, &[], &[("APP_MAXCONN", "1")]);
        let before = cpu_millis(lb.pid());
        let started = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let addr = lb.addr;
                std::thread::spawn(move || try_get(addr, "/slow/600"))
            })
            .collect();
        for t in threads {
            let body = t.join().unwrap().expect("served");
            assert!(body.starts_with("hello from worker"));
        }
        let took = started.elapsed();
        let cpu = cpu_millis(lb.pid()) - before;
        assert!(took >= Duration::from_millis(1100), "two rounds: {took:?}");
        assert!(
            cpu < 300,
            "the master backs off instead of spinning: {cpu} ms CPU"
        );
        lb.signal(libc::SIGTERM);
        lb.wait_exit();
        let refused: u64 = lb
            .log
            .lines()
            .iter()
            .find_map(|l| {
                l.split(" refused by Node workers")
                    .next()?
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .expect("the stop line counts refusals");
        eprintln!("refused {refused} times in {took:?}");
        assert!((1..200).contains(&refused), "{refused} refusals");
    });
}

#[test]
fn node_worker_that_disconnects_itself_is_acked_and_replaced() {
    each_node(|node| {
        let lb = start(node, 1, &[], &[("APP_QUIT_AFTER", "1")]);
        let first = lb.pid_of_slot(0);
        assert_eq!(pid_of(&get(lb.addr, "/")), first);
        // Without lb's ack the worker would never close its channel or exit.
        lb.wait_log("exit (exit code 0", 1);
        lb.wait_log(": ready", 2);
        let body = get(lb.addr, "/");
        assert_ne!(pid_of(&body), first, "the replacement serves");
    });
}

#[test]
fn node_mode_needs_a_script() {
    let (status, log) = run_to_exit(&["--workers", "1", "--", "node", "-e", "1"], &[]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("evaluates code instead of running a script"),
        "{log}"
    );
    assert_eq!(log.lines().count(), 1, "{log}");
}

#[test]
fn node_https_workers_get_the_shared_server_data_and_serve() {
    each_node(|node| {
        let dir = repo().join("tests/node");
        let app = dir.join("tls-app.js");
        let lb = Lb::start(
            &["--workers", "2", "--", node, app.to_str().unwrap()],
            &[],
            2,
        );
        let out = std::process::Command::new(node)
            .arg(dir.join("tls-client.js"))
            .args([lb.addr.port().to_string(), "4".into()])
            .output()
            .expect("run the https client");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let slots: Vec<usize> = body.lines().map(slot_of).collect();
        assert_eq!(slots, [0, 1, 0, 1], "TLS served by both workers in turn");
    });
}

#[test]
fn node_reload_under_load_fails_no_request() {
    each_node(|node| {
        let lb = start(node, 2, &[], &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let clients = looping_clients(lb.addr, &stop);
        std::thread::sleep(Duration::from_millis(200));
        let out = lb.ctl(&["reload"]);
        assert!(out.contains("reloaded 2 workers to generation 2"), "{out}");
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        eprintln!("node reload under load: {ok} requests served, {failed} failed");
        assert_eq!(failed, 0, "no request fails during a reload");
        // The old workers drained through `disconnect` and left on their own.
        assert_eq!(lb.log.count("gen 1: exit (exit code 0"), 2);
    });
}

/// The preload path in a worker's initial `NODE_OPTIONS` (the preload takes
/// itself out of `process.env`, not out of /proc).
fn preload_of(worker: u32) -> std::path::PathBuf {
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let options = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"NODE_OPTIONS="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("NODE_OPTIONS set under lc");
    let path = options
        .split("--require \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no --require in {options:?}"));
    path.into()
}

/// Without `$XDG_RUNTIME_DIR` the close-report preload goes to `$TMPDIR`,
/// where another user may have put a symlink or a directory of theirs at
/// the name lb used to use (`lb-<pid>-node`). lb must neither follow nor
/// remove it, and must load its own preload from a directory only it can
/// write to, removed at exit.
#[test]
fn node_preload_ignores_what_squats_its_old_name_and_is_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    each_node(|node| {
        for squat in ["symlink", "dir"] {
            let dir = scratch(&format!("preload-{squat}"));
            let tmp = dir.join("tmp");
            let victim = dir.join("victim");
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_dir_all(&victim);
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::create_dir_all(&victim).unwrap();
            std::fs::write(victim.join("marker"), "keep me").unwrap();
            // A script of "theirs": if a worker loads it, it says so.
            let loaded = victim.join("loaded");
            std::fs::write(
                victim.join("close-report.js"),
                format!(
                    "require('fs').writeFileSync({:?}, 'loaded')\n",
                    loaded.to_str().unwrap()
                ),
            )
            .unwrap();
            // The shell execs lb, which keeps its pid: `$$` is lb's pid.
            let put = match squat {
                "symlink" => r#"ln -s "$VICTIM" "$TMPDIR/lb-$$-node""#,
                _ => r#"cp -R "$VICTIM" "$TMPDIR/lb-$$-node""#,
            };
            let script = format!(r#"{put} && exec "$0" "$@""#);
            let control = dir.join("lb.sock");
            let app = node_app();
            let args = [
                "--listen",
                "127.0.0.1:0",
                "--control",
                control.to_str().unwrap(),
                "--workers",
                "2",
                "--policy",
                "lc",
                "--",
                node,
                app.as_str(),
            ];
            let env = [
                ("TMPDIR", tmp.to_str().unwrap()),
                ("VICTIM", victim.to_str().unwrap()),
            ];
            let mut cmd = lb_command_through(&["sh", "-c", &script], &args, &env);
            cmd.env_remove("XDG_RUNTIME_DIR");
            let mut lb = Lb::start_command(cmd, 2);
            lb.control = Some(control.to_str().unwrap().to_string());
            let old = tmp.join(format!("lb-{}-node", lb.pid()));
            let intact = |when: &str| {
                let meta = std::fs::symlink_metadata(&old)
                    .unwrap_or_else(|e| panic!("{squat} at {old:?} {when}: {e}"));
                if squat == "symlink" {
                    assert!(meta.file_type().is_symlink(), "{when}: {meta:?}");
                    assert_eq!(std::fs::read_link(&old).unwrap(), victim, "{when}");
                } else {
                    assert!(meta.is_dir(), "{when}");
                    assert!(old.join("marker").exists(), "{when}");
                }
                assert!(victim.join("marker").exists(), "{when}");
            };
            intact("while lb runs");
            // The workers load lb's own preload, from a private directory.
            let preload = preload_of(lb.pid_of_slot(0));
            assert_eq!(preload, preload_of(lb.pid_of_slot(1)));
            let private = preload.parent().unwrap().to_path_buf();
            assert_eq!(private.parent(), Some(tmp.as_path()), "{preload:?}");
            assert_ne!(private, old);
            let meta = std::fs::symlink_metadata(&private).unwrap();
            assert!(meta.is_dir(), "{private:?}");
            assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "{private:?}");
            assert!(
                std::fs::read_to_string(&preload)
                    .unwrap()
                    .contains("lb_closed")
            );
            // ...and it works: every close is reported.
            for _ in 0..6 {
                get(lb.addr, "/");
            }
            let totals = lb.wait_all_closed();
            assert_eq!(totals.iter().map(|t| t.0).sum::<u64>(), 6, "{totals:?}");
            assert!(!loaded.exists(), "a worker loaded the squatter's script");
            lb.signal(libc::SIGTERM);
            lb.wait_exit();
            intact("after lb stopped");
            assert!(!private.exists(), "{private:?} is removed at exit");
            let left: Vec<_> = std::fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(left, [old], "only what was there before is left");
        }
    });
}

/// `tests/node/listeners.js`, one server per address in `listen`, under lb
/// with `args` (its own `--listen`s among them).
fn start_listeners_app(node: &str, workers: usize, args: &[&str], listen: &str) -> Lb {
    let app = repo().join("tests/node/listeners.js");
    let n = workers.to_string();
    let mut full = vec!["--workers", n.as_str()];
    full.extend_from_slice(args);
    full.extend(["--", node, app.to_str().unwrap()]);
    Lb::start(&full, &[("APP_LISTEN", listen)], workers)
}

/// The worker slot in a `listeners.js` reply.
fn worker_of(body: &str) -> usize {
    body.split(" worker ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a listeners.js reply: {body:?}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An app behind lb's Unix listener listens on that path (as it would
/// behind nginx): it is served through the socket, its `server.address()`
/// is the path, and lb's TCP listener goes to the same server, its only one.
#[test]
fn node_app_listening_on_a_unix_path_is_served_by_lbs_unix_listener() {
    each_node(|node| {
        let dir = scratch("node-unix-listener");
        let sock = dir.join("app.sock");
        let _ = std::fs::remove_file(&sock);
        let spec = format!("unix:{}", sock.display());
        let path = sock.to_str().unwrap();
        let lb = start_listeners_app(node, 2, &["--listen", &spec], path);
        lb.wait_log(&format!("message: {{\"listening\":[\"{path}\"]"), 2);
        let mut failed = 0;
        let mut workers = [0; 2];
        for _ in 0..40 {
            match try_get_unix(&sock, "/") {
                Ok(body) => {
                    assert!(
                        body.starts_with(&format!("server {path} worker "))
                            && body.contains(&format!("address \"{path}\"")),
                        "{body:?}"
                    );
                    workers[worker_of(&body)] += 1;
                }
                Err(_) => failed += 1,
            }
        }
        assert_eq!((failed, workers), (0, [20, 20]), "failed, per worker");
        let tcp = get(lb.addr, "/");
        assert!(tcp.starts_with(&format!("server {path} worker")), "{tcp:?}");
        assert_eq!(lb.log.count("refused"), 0);
    });
}

/// An app with one server per lb listener (two ports): each request is
/// answered by the server of the port it came to.
#[test]
fn node_app_with_a_server_per_listener_answers_each_from_its_port() {
    each_node(|node| {
        let (a, b) = (free_port(), free_port());
        let (la, lbb) = (format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}"));
        let lb = start_listeners_app(
            node,
            2,
            &["--listen", &la, "--listen", &lbb],
            &format!("{a},{b}"),
        );
        lb.wait_log("message: {\"listening\":[", 2);
        let mut failed = 0;
        for port in [a, b, a] {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            for _ in 0..20 {
                match try_get(addr, "/") {
                    Ok(body) => {
                        assert!(
                            body.starts_with(&format!("server {port} "))
                                && body.contains(&format!("\"port\":{port}}}")),
                            "{body:?}"
                        );
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        assert_eq!(failed, 0);
        assert_eq!(lb.log.count("refused"), 0);
        // Once a worker closes the server of one port, that port's
        // connections go to its other server (the other worker's still
        // to its own server of that port).
        let on_a: std::net::SocketAddr = format!("127.0.0.1:{a}").parse().unwrap();
        let closed = get(on_a, "/close");
        assert!(closed.starts_with(&format!("server {a} ")), "{closed:?}");
        let closer = worker_of(&closed);
        let mut wrong = Vec::new();
        for _ in 0..20 {
            match try_get(on_a, "/") {
                Ok(body) => {
                    let want = if worker_of(&body) == closer { b } else { a };
                    if !body.starts_with(&format!("server {want} ")) {
                        wrong.push(body);
                    }
                }
                Err(_) => failed += 1,
            }
        }
        assert_eq!(failed, 0);
        assert!(wrong.is_empty(), "{wrong:?}");
    });
}

/// The one-server app (`listen(8000)`, none of lb's ports) behind a TCP
/// and a Unix listener: both go to its server, as with one listener.
#[test]
fn node_app_with_one_server_takes_every_listener() {
    each_node(|node| {
        let dir = scratch("node-one-server");
        let sock = dir.join("lb.sock");
        let _ = std::fs::remove_file(&sock);
        let spec = format!("unix:{}", sock.display());
        let lb = start(node, 2, &["--listen", &spec], &[]);
        let mut failed = 0;
        let mut workers = [0; 2];
        for i in 0..60 {
            let got = if i % 2 == 0 {
                try_get(lb.addr, "/")
            } else {
                try_get_unix(&sock, "/")
            };
            match got {
                Ok(body) => workers[slot_of(&body)] += 1,
                Err(_) => failed += 1,
            }
        }
        assert_eq!((failed, workers), (0, [30, 30]), "failed, per worker");
    });
}
